"""FID and KID on the EMA generator against cached real statistics, with the floor.

The default feature network is a small digit classifier trained by
``pipelines/build_evaluator.py`` (weights committed under gan/assets, sha256 recorded
with every result). For other labelled data the same script trains a classifier for that
domain and stores it beside the prepared dataset (backbone 'classifier'); for unlabelled
data, any TorchScript or ONNX feature extractor (an exported Inception-v3, say) can replace
it from a path or URI the user gives. A classifier backbone also scores how conditional a
class-conditional generator is: the share of samples drawn for class k classified as k.
Rules that keep FID honest: float64 statistics and an eigenvalue square root
(torchmetrics), a fixed sample count, generated images quantised to uint8 exactly like
real ones, the same seed at every evaluation, and the floor (real vs held-out real at the same N) reported beside every FID.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fsspec.registry import known_implementations
from torchmetrics.image.kid import poly_mmd

from gan.core.config import USER_BACKBONES, ConfigError, DataConfig, EvalConfig
from gan.core.sampling import latents, to_uint8
from gan.data.datasets import MANIFEST, Dataset, class_shares, prepared_manifest

DIGITS_EVALUATOR_FILE = "digits_evaluator.pt"
DOMAIN_EVALUATOR_FILE = "evaluator.pt"  # beside a prepared dataset's manifest
DOMAIN_EVALUATOR_FORMAT = "gan-evaluator/1"
SPLIT_SEED = 20140610  # fixed, independent of training seeds: the same real sets always
EVAL_SEED = 1234  # the same latents at every evaluation: FID moves only when G does
# Leakage: a sample is a near-copy when it is closer (in the evaluator's feature space) to
# its nearest training image than all but COPY_QUANTILE of training images are to theirs.
COPY_QUANTILE = 0.01
COPY_REFERENCE = 10_000  # training images a sample is compared with, at most (memory: x feature size)
COPY_QUERIES = 2_000  # training images that set the real-vs-real distance
PR_NEIGHBOURS = 3  # k of the k-NN balls of precision and recall (Kynkaanniemi et al., 2019)


class DigitClassifier(nn.Module):
    """Small CNN on 28x28 grayscale digits; ``features`` is its 128-d penultimate layer."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # 4
            nn.Flatten(),
            nn.Linear(64 * 16, self.num_features), nn.ReLU(),
        )  # fmt: skip
        self.classify = nn.Linear(self.num_features, 10)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 N x C x H x W (any C, any size) -> float N x 1 x 28 x 28, standardised."""
        x = images.float() / 255.0
        if x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="area" if x.shape[-1] > 28 else "bilinear")
        return (x - 0.1307) / 0.3081

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))


class DomainClassifier(nn.Module):
    """Small CNN for any labelled dataset (``channels`` x ``resolution`` px); ``features``
    is its 256-d penultimate layer. Trained per dataset by pipelines/build_evaluator.py."""

    num_features = 256

    def __init__(self, channels: int, resolution: int, num_classes: int) -> None:
        super().__init__()
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        layers: list[nn.Module] = []
        width_in, side = channels, resolution
        for width in (32, 64, 128, 128)[: max(1, math.ceil(math.log2(resolution / 4)))]:
            layers += [nn.Conv2d(width_in, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1), nn.ReLU()]
            width_in, side = width, (side + 1) // 2
        self.body = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(width_in * side * side, self.num_features), nn.ReLU()
        )
        self.classify = nn.Linear(self.num_features, num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x C x H x W -> float in [-1, 1] at this network's channels and size."""
        x = images.float() / 127.5 - 1
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, self.channels, -1, -1)
        if x.shape[-1] != self.resolution:
            x = F.interpolate(
                x, size=(self.resolution,) * 2, mode="area" if x.shape[-1] > self.resolution else "bilinear"
            )
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))


class _ClassifierFeatures(nn.Module):
    """uint8 images in, a classifier's features out; ``logits`` classifies those features.
    Holds the classifier as a submodule so ``.to(device)`` moves it."""

    def __init__(self, model: DigitClassifier | DomainClassifier) -> None:
        super().__init__()
        self.model = model
        self.num_classes = model.classify.out_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.classify(features)


class _ScriptedFeatures(nn.Module):
    """A user's TorchScript extractor (float images in [0, 1]) behind the uint8 interface;
    a module, so ``.to(device)`` moves its weights."""

    def __init__(self, scripted: nn.Module) -> None:
        super().__init__()
        self.scripted = scripted

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scripted(images.float() / 255.0).flatten(1)


class _OnnxFeatures(nn.Module):
    """A user's ONNX extractor (float images in [0, 1]) run by onnxruntime behind the uint8
    interface. Exporters fix the input shape unless told otherwise, so a fixed height or
    width gets images resized to it on that side, and a fixed batch size gets batches of it
    (the last one padded). On a CUDA device it runs on that GPU where onnxruntime-gpu is
    installed."""

    def __init__(self, raw: bytes, device: torch.device | str = "cpu") -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # train.threads, not every core
        device = torch.device(device)
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            gpu = torch.cuda.current_device() if device.index is None else device.index  # each rank its own GPU
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu}))
        self.session = onnxruntime.InferenceSession(raw, options, providers=providers)
        if device.type == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            warnings.warn(
                "eval.backbone=onnx runs on the CPU: install onnxruntime-gpu to run it on the GPU", stacklevel=2
            )
        net_input = self.session.get_inputs()[0]
        # Symbolic sides are strings (or None, or -1 from some exporters): any size goes there.
        shape = [d if isinstance(d, int) and d > 0 else None for d in net_input.shape or []]
        if len(shape) != 4 or (shape[1] not in (None, 1, 3) and shape[3] in (1, 3)):
            raise ValueError(f"its input {net_input.name!r} has shape {net_input.shape}, not N x C x H x W")
        self.input_name = net_input.name
        self.batch, _, self.height, self.width = shape

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        size = (self.height or x.shape[2], self.width or x.shape[3])
        if size != tuple(x.shape[2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = x.cpu().numpy()
        step = self.batch or len(x)
        out = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            padded = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            out.append(self.session.run(None, {self.input_name: padded})[0][: len(chunk)])
        return torch.from_numpy(np.concatenate(out)).reshape(len(x), -1).to(images.device)


def evaluator_path() -> Path:
    return Path(__file__).parents[1] / "assets" / DIGITS_EVALUATOR_FILE


def load_digit_classifier() -> tuple[DigitClassifier, str]:
    path = evaluator_path()
    raw = path.read_bytes()
    model = DigitClassifier()
    model.load_state_dict(torch.load(io.BytesIO(raw), weights_only=True))
    return model.eval().requires_grad_(False), hashlib.sha256(raw).hexdigest()


def evaluator_uri(eval_cfg: EvalConfig, data_uri: str) -> str:
    """Where a backbone other than 'digits' is read: eval.backbone_uri, else (a classifier)
    the evaluator.pt beside the prepared dataset."""
    return eval_cfg.backbone_uri or f"{data_uri.removesuffix(MANIFEST).rstrip('/')}/{DOMAIN_EVALUATOR_FILE}"


def backbone_file(cfg: EvalConfig, data_uri: str, data_options: dict | None) -> tuple[str, dict]:
    """(where the backbone is read, the storage options to read it with): the data's, for a
    file on the same kind of filesystem only (s3 and s3a are one), since another would take
    an endpoint or credentials meant for the data's."""
    uri = evaluator_uri(cfg, data_uri)
    return uri, dict(data_options or {}) if _filesystem(uri) == _filesystem(data_uri) else {}


def _filesystem(uri: str) -> str:
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    return known_implementations.get(protocol, {}).get("class", protocol)


def read_checked(uri: str, label: str, storage_options: dict, expected_sha256: str, missing: str) -> tuple[bytes, str]:
    """(the file's bytes, their sha256), refused in one line that starts with ``label`` when
    the file is missing (``missing`` says what should be there), unreadable or not the one
    the sha256 names."""
    try:
        with fsspec.open(uri, "rb", **storage_options) as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such file ({missing})") from None
    except Exception as err:  # each filesystem raises its own types; the message says which
        raise ConfigError(f"{label}: cannot read it ({one_line(err)})") from None
    sha = hashlib.sha256(raw).hexdigest()
    if expected_sha256 and sha != expected_sha256:
        raise ConfigError(f"{uri}: its sha256 is {sha}, not eval.backbone_sha256={expected_sha256}")
    return raw, sha


def read_domain_evaluator(
    uri: str, storage_options: dict | None = None, expected_sha256: str = ""
) -> tuple[DomainClassifier, dict, str]:
    """(classifier, its metadata, sha256 of the file) from a file build_evaluator.py wrote;
    ``storage_options`` for the file's own filesystem."""
    missing = "an evaluator: pipelines/build_evaluator.py --data DATA"
    raw, sha = read_checked(uri, uri, storage_options or {}, expected_sha256, missing)
    try:
        saved = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        if not isinstance(saved, dict) or saved.get("format") != DOMAIN_EVALUATOR_FORMAT:
            raise ValueError("not written by pipelines/build_evaluator.py")
        meta = saved["meta"]
        model = DomainClassifier(meta["channels"], meta["resolution"], meta["num_classes"])
        model.load_state_dict(saved["state_dict"])
    except Exception as err:  # torch.load and a wrong state dict raise many types; the message says which
        raise ConfigError(f"{uri}: not a readable evaluator ({one_line(err)})") from None
    return model.eval().requires_grad_(False), meta, sha


def load_backbone(
    cfg: EvalConfig, data_uri: str = "", storage_options: dict | None = None, device: torch.device | str = "cpu"
) -> tuple[nn.Module, str]:
    """(feature module taking uint8 NCHW on ``device``, sha256 of its weights);
    ``storage_options`` are the data's."""
    if cfg.backbone == "digits":
        model, sha = load_digit_classifier()
        return _ClassifierFeatures(model).to(device), sha
    uri, options = backbone_file(cfg, data_uri, storage_options)
    if cfg.backbone == "classifier":
        model, _, sha = read_domain_evaluator(uri, options, cfg.backbone_sha256)
        return _ClassifierFeatures(model).to(device), sha
    # The entry points checked the file before starting (promote.py does not); a missing file fails this read.
    return read_user_network(cfg, options, device)


def read_user_network(
    cfg: EvalConfig, storage_options: dict | None = None, device: torch.device | str = "cpu"
) -> tuple[nn.Module, str]:
    """(the user's TorchScript or ONNX feature network on ``device``, sha256 of its file);
    ``storage_options`` for the file's own filesystem."""
    kind = "a TorchScript module" if cfg.backbone == "torchscript" else "an ONNX network"
    if cfg.backbone == "onnx":
        try:
            import onnxruntime  # noqa: F401  (optional: only this backbone needs it)
        except ImportError:
            raise ConfigError("eval.backbone=onnx runs the network with onnxruntime: pip install 'gan[onnx]'") from None
    label = f"eval.backbone_uri={cfg.backbone_uri}"
    raw, sha = read_checked(cfg.backbone_uri, label, storage_options or {}, cfg.backbone_sha256, kind)
    try:
        if cfg.backbone == "onnx":
            return _OnnxFeatures(raw, device), sha
        return _ScriptedFeatures(torch.jit.load(io.BytesIO(raw), map_location=device).eval()), sha
    except Exception as err:  # TorchScript and onnxruntime raise many types; the message says which
        raise ConfigError(f"{label}: cannot be loaded as {kind} ({one_line(err)})") from None


def check_domain_evaluator(cfg: EvalConfig, data: DataConfig) -> None:
    """The evaluator build_evaluator.py wrote loads and takes the data's images; the one
    beside a prepared dataset was built on what that dataset holds now (a dataset prepared
    again over an old one would otherwise be scored by the old one's features)."""
    manifest = None  # only the evaluator beside the data is tied to it; a named one is the user's choice
    if not cfg.backbone_uri:
        manifest = None if data.uri.startswith("embedded:") else prepared_manifest(data.uri, data.fsspec_options())
        if manifest is None:
            raise ConfigError(
                f"eval.backbone=classifier reads the evaluator beside a prepared dataset, and {data.uri} is not one: "
                "prepare it (pipelines/prepare_data.py, then build_evaluator.py --data) or set eval.backbone_uri"
            )
    uri, options = backbone_file(cfg, data.uri, data.fsspec_options())
    _, meta, _ = read_domain_evaluator(uri, options, cfg.backbone_sha256)
    shape, wanted = (meta["channels"], meta["resolution"]), (data.channels, data.resolution)
    if shape != wanted:
        raise ConfigError(
            f"{uri} scores {shape[0]}-channel images at {shape[1]} px, and the data is {wanted[0]}-channel at "
            f"{wanted[1]} px: build an evaluator for it (python pipelines/build_evaluator.py --data {data.uri})"
        )
    if manifest is not None and meta.get("dataset_fingerprint") != manifest["sha256"]:
        raise ConfigError(
            f"{uri} was built on other data than {data.uri} holds now (prepared again since?): rebuild it with "
            f"python pipelines/build_evaluator.py --data {data.uri} --overwrite, or name it in eval.backbone_uri "
            "to keep scoring with it"
        )


def check_backbone(cfg: EvalConfig, data: DataConfig | None = None) -> None:
    """The feature network must be there, and fit the data, before any training starts."""
    if data is not None and cfg.backbone == "digits" and data.channels == 3:
        raise ConfigError(
            "eval.backbone=digits scores grayscale digits, not RGB images: build an evaluator for this data "
            f"(python pipelines/build_evaluator.py --data {data.uri}) and --set eval.backbone=classifier, "
            "or give your own feature network (eval.backbone=torchscript or onnx)"
        )
    if data is not None and cfg.backbone == "classifier":
        check_domain_evaluator(cfg, data)
        return
    if cfg.backbone not in USER_BACKBONES:
        return
    if "://" in cfg.backbone_uri and not cfg.backbone_uri.startswith("file://") and not cfg.backbone_sha256:
        raise ConfigError(
            f"eval.backbone_uri={cfg.backbone_uri}: a network fetched from a URI is checked against the sha256 "
            "you expect: --set eval.backbone_sha256=<sha256sum of the file>"
        )
    options = None if data is None else backbone_file(cfg, data.uri, data.fsspec_options())[1]
    network, _ = read_user_network(cfg, options)
    if data is None:
        return
    try:  # one blank image of the data's shape: a network that cannot take it fails here, not mid-run
        with torch.no_grad():
            network(torch.zeros(1, data.channels, data.resolution, data.resolution, dtype=torch.uint8))
    except Exception as err:  # TorchScript and onnxruntime raise many types; the message says which
        raise ConfigError(
            f"eval.backbone_uri={cfg.backbone_uri}: cannot take {data.channels}x{data.resolution}x{data.resolution} "
            f"images in [0, 1] ({one_line(err)})"
        ) from None


def one_line(err: Exception) -> str:
    """'Type: message' on one line. TorchScript's last line is that, after a trace of the
    scripted code; other messages' lines are all the cause."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "Traceback of TorchScript" in str(err):
        return lines[-1]
    text = " ".join(lines)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


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
        to_uint8(G(z[i : i + batch], None if labels is None else labels[i : i + batch]))
        for i in range(0, stop - start, batch)
    ]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8, device=device)


def proportional_labels(shares: torch.Tensor, n: int) -> torch.Tensor:
    """n labels in the classes' proportions, without randomness: label i is the class whose
    stretch of the cumulative shares holds (i + 0.5) / n, so the counts are exact to one."""
    points = (torch.arange(n, device=shares.device, dtype=torch.float64) + 0.5) / n
    edges = shares.double().cumsum(0)
    return torch.searchsorted(edges, points, right=True).clamp_(max=len(shares) - 1)


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
        images = generate(G, n, seed=seed, labels=labels, device=self.device, rank=rank, world_size=world_size)
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


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of samples drawn for class k that the evaluator classifies as k."""
    return float((logits.argmax(1) == labels).float().mean())


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
