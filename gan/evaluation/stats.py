"""The statistics a generator is scored with, as pure functions of feature rows.

FID (Frechet distance of Gaussians fitted in float64, eigenvalue square root as
torchmetrics computes it), KID, k-NN precision and recall, variety within classes, class
accuracy and the share of near-copies of training images. No networks, no files.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.image.kid import poly_mmd

SPLIT_SEED = 20140610  # fixed, independent of training seeds: the same real sets always
EVAL_SEED = 1234  # the same latents at every evaluation: FID moves only when G does
# Leakage: a sample is a near-copy when it is closer (in the evaluator's feature space) to
# its nearest training image than all but COPY_QUANTILE of training images are to theirs.
COPY_QUANTILE = 0.01
COPY_QUERIES = 2_000  # training images that set the real-vs-real distance
PR_NEIGHBOURS = 3  # k of the k-NN balls of precision and recall (Kynkaanniemi et al., 2019)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """The eigenvalue form torchmetrics uses: ||mu1 - mu2||^2 + Tr(s1 + s2 - 2 sqrt(s1 s2))."""
    a = (mu1 - mu2).square().sum()
    c = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float(a + sigma1.trace() + sigma2.trace() - 2 * c)


def gaussian(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance in float64, as torchmetrics accumulates them."""
    f = features.double()
    n = f.shape[0]
    mean = f.sum(0) / n
    cov = (f.t() @ f - n * torch.outer(mean, mean)) / (n - 1)
    return mean, cov


def kid(real: torch.Tensor, fake: torch.Tensor, subset_size: int, subsets: int = 100, seed: int = EVAL_SEED) -> float:
    """KID: mean polynomial-kernel MMD over random subsets, drawn from a generator seeded
    with ``seed`` on the features' device (as torchmetrics does with the global RNG)."""
    g = torch.Generator(device=real.device).manual_seed(seed)
    scores = []
    for _ in range(subsets):
        f_real = real[torch.randperm(len(real), generator=g, device=real.device)[:subset_size]]
        f_fake = fake[torch.randperm(len(fake), generator=g, device=real.device)[:subset_size]]
        scores.append(poly_mmd(f_real, f_fake))
    return float(torch.stack(scores).mean())


def distance_blocks(queries: torch.Tensor, reference: torch.Tensor):
    """(first query row, Euclidean distances of a block of queries to every reference row),
    blocks of at most 256K entries. The reference's squared norms are computed once; each
    block allocates only itself (torch.cdist copies the whole reference on every call)."""
    ref = reference.float()
    ref_sq = ref.square().sum(1)
    step = max(1, 2**18 // max(len(ref), 1))
    for i in range(0, len(queries), step):
        q = queries[i : i + step].float()
        d = (q @ ref.T).mul_(-2).add_(ref_sq).add_(q.square().sum(1, keepdim=True))
        yield i, d.clamp_(min=0).sqrt_()


def nearest_distance(
    queries: torch.Tensor, reference: torch.Tensor, own_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Euclidean distance from each query to its nearest reference row; ``own_rows[i]``:
    the reference row query i is, which it must not find."""
    out = []
    for i, d in distance_blocks(queries, reference):
        if own_rows is not None:
            d[torch.arange(d.shape[0], device=d.device), own_rows[i : i + len(d)]] = math.inf
        out.append(d.min(1).values)
    return torch.cat(out)


def knn_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS) -> torch.Tensor:
    """Each row's distance to its k-th nearest other row."""
    return torch.cat([d.kthvalue(k + 1, dim=1).values for _, d in distance_blocks(features, features)])


def covered(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """The share of queries inside at least one centre's ball."""
    inside = [(d <= radii).any(1) for _, d in distance_blocks(queries, centres)]
    return float(torch.cat(inside).float().mean())


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, real_radii: torch.Tensor | None = None
) -> tuple[float, float]:
    """k-NN precision (the share of samples that look real: inside some real image's
    k-NN ball) and recall (the share of real images the samples cover), in feature space.
    Poor samples lower precision; dropped modes lower recall, where FID mixes both."""
    real_radii = knn_radii(real) if real_radii is None else real_radii
    return covered(fake, real, real_radii), covered(real, fake, knn_radii(fake))


def class_variety(
    real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor
) -> float:
    """Variety within classes against the data's: for each class with two or more samples
    and real images, the mean pairwise feature distance of its samples over that of its
    real images, averaged with the classes' sample counts as weights. About 1 when samples
    vary as much as the data within each class, 0 when G draws one image per class whatever
    its latent: a collapse that recall, taken over all classes together, barely shows."""
    total, weight = 0.0, 0
    for k in fake_labels.unique().tolist():
        f, r = fake[fake_labels == k], real[real_labels == k]
        if len(f) >= 2 and len(r) >= 2:
            total += len(f) * float(torch.pdist(f).mean() / torch.pdist(r).mean())
            weight += len(f)
    return total / weight if weight else float("nan")


def copy_threshold(reference: torch.Tensor, quantile: float = COPY_QUANTILE, queries: int = COPY_QUERIES) -> float:
    """The real-vs-real nearest-neighbour distance at ``quantile`` (over a fixed random
    subset of training images, each against all the others): a sample closer than this to
    a training image is nearer to it than almost any training image is to another."""
    g = torch.Generator(device="cpu").manual_seed(SPLIT_SEED)
    rows = torch.randperm(len(reference), generator=g, device="cpu")[:queries].to(reference.device)
    return float(torch.quantile(nearest_distance(reference[rows], reference, rows).double(), quantile))


def copy_share(fake: torch.Tensor, reference: torch.Tensor, threshold: float) -> float:
    """The share of samples that are near-copies of a training image."""
    return float((nearest_distance(fake, reference) < threshold).float().mean())


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of samples drawn for class k that the evaluator classifies as k."""
    return float((logits.argmax(1) == labels).float().mean())
