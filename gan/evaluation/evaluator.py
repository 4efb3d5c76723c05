"""The evaluator: FID, KID, precision/recall and leakage of a generator against cached
real statistics, with the floor beside FID.

Rules that keep FID honest: a fixed sample count, generated images quantised to uint8
exactly like real ones, the same seed at every evaluation, real sets chosen by a fixed seed,
and the floor (real vs held-out real at the same N) reported beside every FID. Run on the
EMA generator; split over ranks, every rank reports the same value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from gan.core.config import EvalConfig
from gan.core.sampling import latents, to_pixels
from gan.data.datasets import Dataset, class_shares
from gan.evaluation.backbone import load_backbone
from gan.evaluation.stats import (
    EVAL_SEED,
    SPLIT_SEED,
    class_accuracy,
    class_variety,
    copy_share,
    copy_threshold,
    frechet_distance,
    gaussian,
    kid,
    knn_radii,
    precision_recall,
)

COPY_REFERENCE = 10_000  # training images a sample is compared with, at most (memory: x feature size)
GENERATE_BATCH = 500
"""Images G draws at once for an evaluation, up to 64 px; fewer above, at the same pixels per
batch (125 at 128 px), so a wide 128-px G's activations stay within a GPU's memory."""


def generate_batch(height: int, width: int) -> int:
    return max(1, min(GENERATE_BATCH, GENERATE_BATCH * 64 * 64 // (height * width)))


def split_real(n_images: int, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint reference and held-out index sets of equal size (at most num_samples)."""
    n = min(num_samples, n_images // 2)
    g = torch.Generator(device="cpu").manual_seed(SPLIT_SEED)
    perm = torch.randperm(n_images, generator=g, device="cpu")
    return perm[:n], perm[n : 2 * n]


Gather = Callable[[torch.Tensor], torch.Tensor]


def shard(n: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(start, stop, padded share): rank's slice of n items, every share the same length
    (the last rank's tail is padding) so features can be all-gathered."""
    per = -(-n // world_size)
    start = min(rank * per, n)
    return start, min(start + per, n), per


@torch.no_grad()
def generate(
    G: nn.Module,
    n: int,
    *,
    seed: int,
    labels: torch.Tensor | None,
    batch: int = 500,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """This rank's share of n uint8 images from G, on ``device``, image i drawn for
    ``labels[i]`` (all n). Image i is the same whatever the number of ranks."""
    start, stop, per = shard(n, rank, world_size)
    z = latents(n, G.z_dim, seed, device=device)[start:stop]
    labels = None if labels is None else labels[start:stop]
    out = [
        to_pixels(G(z[i : i + batch], None if labels is None else labels[i : i + batch]))
        for i in range(0, stop - start, batch)
    ]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8, device=device)


def proportional_labels(shares: torch.Tensor, n: int) -> torch.Tensor:
    """n labels in the classes' proportions, without randomness: label i is the class whose
    stretch of the cumulative shares holds (i + 0.5) / n, so the counts are exact to one."""
    points = (torch.arange(n, device=shares.device, dtype=torch.float64) + 0.5) / n
    edges = shares.double().cumsum(0)
    return torch.searchsorted(edges, points, right=True).clamp_(max=len(shares) - 1)


class Evaluator:
    """Holds the real statistics on the run's device; each call scores a generator on the
    same latents. Split over ranks, each generates its share and the features are
    gathered (StyleGAN's metric code does the same), so every rank reports the same value."""

    def __init__(
        self, cfg: EvalConfig, data: Dataset, device: torch.device | str = "cpu", storage_options: dict | None = None
    ) -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.backbone, self.sha256 = load_backbone(cfg, data.source, storage_options, self.device)
        ref_idx, held_idx = split_real(len(data), cfg.num_samples)
        if len(ref_idx) < 2:
            raise ValueError(f"the dataset has {len(data)} images; FID needs at least 4")
        self.num_real = len(ref_idx)
        self.kid_subset = min(cfg.kid_subset_size, self.num_real)
        self.data_labels = data.labels  # a conditional G is scored in the data's class mix
        self.batch = generate_batch(*data.shape[1:])
        self.real_labels = None if data.labels is None else data.labels[ref_idx].to(self.device)
        self.real_features = self.real_features_of(data, ref_idx)
        self.real_gaussian = gaussian(self.real_features)
        self.real_radii = knn_radii(self.real_features)
        # The floor: the FID a perfect generator would get at this sample count.
        held = self.real_features_of(data, held_idx)
        self.floor = frechet_distance(*gaussian(held), *self.real_gaussian)
        # Every training image up to the cap (a fixed choice beyond it), read in index order.
        g = torch.Generator(device="cpu").manual_seed(SPLIT_SEED)
        pick = torch.randperm(len(data), generator=g, device="cpu")[:COPY_REFERENCE].sort().values
        # In batches no larger than FID's own reads, so the reference adds no memory peak.
        self.copy_reference = self.real_features_of(data, pick, batch=min(500, len(ref_idx)))
        self.copy_threshold = copy_threshold(self.copy_reference)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
        return torch.cat([self.backbone(images[i : i + batch]).float() for i in range(0, len(images), batch)])

    @torch.no_grad()
    def real_features_of(self, data: Dataset, idx: torch.Tensor, batch: int = 500) -> torch.Tensor:
        """Features of the real images at ``idx``, read a batch at a time: a streamed dataset
        is never held whole."""
        return torch.cat(
            [self.backbone(data.rows(idx[i : i + batch]).to(self.device)).float() for i in range(0, len(idx), batch)]
        )

    def score_features(self, fake: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """FID, KID, precision, recall and copies of these features; with the labels the
        samples were drawn for, also the share the evaluator classifies as their label and
        their variety within classes."""
        fid = frechet_distance(*gaussian(fake), *self.real_gaussian)
        kid_mean = kid(self.real_features, fake, min(self.kid_subset, len(fake)))
        copies = copy_share(fake, self.copy_reference, self.copy_threshold)
        precision, recall = precision_recall(self.real_features, fake, self.real_radii)
        scores = {"fid": fid, "kid": kid_mean, "fid_floor": self.floor, "precision": precision, "recall": recall,
                  "leakage/copy_share": copies}  # fmt: skip
        if labels is not None and self.classifies(int(labels.max()) + 1):
            scores["class_accuracy"] = class_accuracy(self.backbone.logits(fake), labels)
        if labels is not None and self.real_labels is not None:
            scores["class_variety"] = class_variety(self.real_features, self.real_labels, fake, labels)
        return scores

    def classifies(self, num_classes: int) -> bool:
        """Whether this backbone can tell a conditional generator's ``num_classes`` classes."""
        return getattr(self.backbone, "num_classes", 0) >= num_classes > 0

    def score_images(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        return self.score_features(self.features(images.to(self.device)), labels)

    def __call__(
        self,
        G: nn.Module,
        num_classes: int,
        seed: int = EVAL_SEED,
        *,
        rank: int = 0,
        world_size: int = 1,
        gather: Gather | None = None,
    ) -> dict[str, float]:
        """Score G; with ``world_size`` > 1 this rank makes its share and ``gather``
        (an all-gather over ranks, concatenated in rank order) brings the features together."""
        was_training = G.training
        G.eval()
        n = self.cfg.num_samples
        shares = class_shares(self.data_labels, num_classes) if num_classes else None
        labels = None if shares is None else proportional_labels(shares, n).to(self.device)
        images = generate(
            G, n, seed=seed, labels=labels, batch=self.batch, device=self.device, rank=rank, world_size=world_size
        )
        G.train(was_training)
        if world_size == 1:
            return self.score_features(self.features(images), labels)
        if gather is None:
            raise ValueError(f"world_size={world_size} needs a gather function")
        start, stop, per = shard(n, rank, world_size)
        padded = torch.zeros(per, self.real_features.shape[1], device=self.device)
        if stop > start:
            padded[: stop - start] = self.features(images)
        # Rank r's rows hold images r*per.. in order, so the gathered set is the one-rank set.
        return self.score_features(gather(padded)[:n], labels)


@dataclass(frozen=True)
class FIDEstimate:
    """FID over several fresh latent seeds: mean and 95% t-interval half-width."""

    mean: float
    ci95: float
    values: tuple[float, ...]
    floor: float
    copy_share: float
    """Mean share of samples that are near-copies of training images."""

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.ci95:.2f} (95% CI, {len(self.values)} seeds; floor {self.floor:.2f})"


def fid_estimate(evaluator: Evaluator, G: nn.Module, num_classes: int, seeds: list[int]) -> FIDEstimate:
    """Score G on each seed's latents (``evaluator.cfg.num_samples`` images each)."""
    from scipy import stats

    scores = [evaluator(G, num_classes, seed=seed) for seed in seeds]
    values = tuple(score["fid"] for score in scores)
    mean = float(np.mean(values))
    half = (
        float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))
        if len(values) > 1
        else float("inf")
    )
    copies = float(np.mean([score["leakage/copy_share"] for score in scores]))
    return FIDEstimate(mean, half, values, evaluator.floor, copies)
