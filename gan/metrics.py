"""FID and KID on the EMA generator against cached real statistics, with the floor.

The default feature network is a small digit classifier trained by
``pipelines/build_evaluator.py`` (weights committed under gan/assets, sha256 recorded
with every result). Any TorchScript feature extractor (an exported Inception-v3, say)
can replace it from a path or URI the user gives. Rules that keep FID honest: float64
statistics and an eigenvalue square root (torchmetrics), a fixed sample count, generated
images quantised to uint8 exactly like real ones, the same seed at every evaluation,
and the floor (real vs held-out real at the same N) reported beside every FID.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from gan.config import EvalConfig
from gan.data import ImageDataset
from gan.sampling import to_uint8

EVALUATOR_FILE = "digits_evaluator.pt"
SPLIT_SEED = 20140610  # fixed, independent of training seeds: the same real sets always
EVAL_SEED = 1234  # the same latents at every evaluation: FID moves only when G does


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


class _FeatureAdapter(nn.Module):
    """What torchmetrics calls: uint8 images in, features out."""

    def __init__(self, extract, num_features: int) -> None:
        super().__init__()
        self.extract = extract
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(images)


def evaluator_path() -> Path:
    return Path(__file__).parent / "assets" / EVALUATOR_FILE


def load_digit_classifier() -> tuple[DigitClassifier, str]:
    path = evaluator_path()
    raw = path.read_bytes()
    model = DigitClassifier()
    model.load_state_dict(torch.load(io.BytesIO(raw), weights_only=True))
    return model.eval().requires_grad_(False), hashlib.sha256(raw).hexdigest()


def load_backbone(cfg: EvalConfig) -> tuple[nn.Module, str]:
    """(feature module taking uint8 NCHW, sha256 of its weights)."""
    if cfg.backbone == "digits":
        model, sha = load_digit_classifier()
        return _FeatureAdapter(model.features, model.num_features), sha
    with fsspec.open(cfg.backbone_uri, "rb") as handle:
        raw = handle.read()
    scripted = torch.jit.load(io.BytesIO(raw), map_location="cpu").eval()

    def extract(images: torch.Tensor) -> torch.Tensor:
        return scripted(images.float() / 255.0).flatten(1)

    with torch.no_grad():
        dim = extract(torch.zeros(1, 3, 299, 299, dtype=torch.uint8)).shape[1]
    return _FeatureAdapter(extract, dim), hashlib.sha256(raw).hexdigest()


def split_real(n_images: int, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint reference and held-out index sets of equal size (at most num_samples)."""
    n = min(num_samples, n_images // 2)
    perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[:n], perm[n : 2 * n]


@torch.no_grad()
def generate(G: nn.Module, n: int, *, seed: int, num_classes: int, batch: int = 500, device="cpu") -> torch.Tensor:
    """n uint8 images from G; labels cycle through the classes so every class is scored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        z = torch.randn(m, G.z_dim, generator=g).to(device)
        labels = (torch.arange(start, start + m) % num_classes).to(device) if num_classes else None
        out.append(to_uint8(G(z, labels)).cpu())
    return torch.cat(out)


class Evaluator:
    """Holds the real statistics; each call scores a generator on the same latents."""

    def __init__(self, cfg: EvalConfig, data: ImageDataset, device="cpu") -> None:
        self.cfg, self.device = cfg, device
        self.backbone, self.sha256 = load_backbone(cfg)
        ref_idx, held_idx = split_real(len(data), cfg.num_samples)
        if len(ref_idx) < 2:
            raise ValueError(f"the dataset has {len(data)} images; FID needs at least 4")
        self.num_real = len(ref_idx)
        kid_subset = min(cfg.kid_subset_size, self.num_real)
        self.fid = FrechetInceptionDistance(feature=self.backbone, reset_real_features=False, sync_on_compute=False)
        self.kid = KernelInceptionDistance(
            feature=self.backbone, subset_size=kid_subset, reset_real_features=False, sync_on_compute=False
        )
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for metric in (self.fid, self.kid):
                metric.update(data.images[ref_idx], real=True)
            # The floor: the FID a perfect generator would get at this sample count.
            self.fid.update(data.images[held_idx], real=False)
            self.floor = float(self.fid.compute())
            self.fid.reset()

    def score_images(self, images: torch.Tensor) -> dict[str, float]:
        # fork_rng: KID's random subsets must not move the training RNG.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(EVAL_SEED)
            self.fid.update(images, real=False)
            self.kid.update(images, real=False)
            fid = float(self.fid.compute())
            kid_mean, _ = self.kid.compute()
            self.fid.reset()
            self.kid.reset()
        return {"fid": fid, "kid": float(kid_mean), "fid_floor": self.floor}

    def __call__(self, G: nn.Module, num_classes: int, seed: int = EVAL_SEED) -> dict[str, float]:
        was_training = G.training
        G.eval()
        images = generate(G, self.cfg.num_samples, seed=seed, num_classes=num_classes, device=self.device)
        G.train(was_training)
        return self.score_images(images)


@dataclass(frozen=True)
class FIDEstimate:
    """FID over several fresh latent seeds: mean and 95% t-interval half-width."""

    mean: float
    ci95: float
    values: tuple[float, ...]
    floor: float

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.ci95:.2f} (95% CI, {len(self.values)} seeds; floor {self.floor:.2f})"


def fid_estimate(evaluator: Evaluator, G: nn.Module, num_classes: int, seeds: list[int]) -> FIDEstimate:
    """Score G on each seed's latents (``evaluator.cfg.num_samples`` images each)."""
    from scipy import stats

    values = tuple(evaluator(G, num_classes, seed=seed)["fid"] for seed in seeds)
    mean = float(np.mean(values))
    half = (
        float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))
        if len(values) > 1
        else float("inf")
    )
    return FIDEstimate(mean, half, values, evaluator.floor)
