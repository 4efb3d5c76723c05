"""Sampling a trained generator: images by class and seed, grids, interpolations, .npz.

Images come back as uint8 numpy arrays, N x H x W for grayscale and N x H x W x 3 for
RGB, the format ``pipelines/sample.py`` writes to .npz (key 'images', plus 'labels').
Everything runs on the generator's device (or the one given); images leave it once, as
uint8, to be returned. Latents are drawn by a CPU generator and moved over once: the
same seed then gives the same images on a CPU and on a GPU.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading

import numpy as np
import torch
import torch.nn as nn

from gan.core.config import Config, ConfigError
from gan.core.models import build_models

MAX_SEED = 2**63 - 1
"""Largest sampling seed: a torch generator takes any non-negative int64."""


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """A generator's float output in [-1, 1] -> uint8 pixels, quantised exactly as real
    images are stored."""
    return images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def generator_from_state(state: dict) -> tuple[nn.Module, Config]:
    """The EMA generator of a training checkpoint (or of a logged model's state), in eval mode."""
    cfg = Config.from_json(state["config"])
    G, _ = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)
    G.load_state_dict(state["loop"]["G_ema"] if "loop" in state else state["G_ema"])
    return G.eval().requires_grad_(False), cfg


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def latents(
    n: int, z_dim: int, seed: int, truncation: float | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normal z on ``device``; with ``truncation`` t, each entry is drawn from the
    normal truncated to [-t, t]. Drawn on the CPU (n x z_dim numbers) so a seed means the
    same z on every device."""
    check_request(seed, truncation)
    g = torch.Generator(device="cpu").manual_seed(seed)
    if truncation is None:
        return torch.randn(n, z_dim, generator=g, device="cpu").to(device)
    # Inverse CDF of the truncated normal: one pass for any t, where redrawing the entries
    # beyond t would loop for ever on a tiny t. float64, so a tiny t keeps its precision.
    u = torch.rand(n, z_dim, generator=g, dtype=torch.float64, device="cpu")
    half_mass = torch.special.ndtr(torch.tensor(truncation, dtype=torch.float64, device="cpu")) - 0.5
    z = torch.special.ndtri(0.5 + (2 * u - 1) * half_mass).clamp_(-truncation, truncation)
    return z.float().to(device)


def check_request(seed: int, truncation: float | None = None) -> None:
    """A seed torch takes and a truncation that means something (NaN would silently mean none)."""
    if not 0 <= seed <= MAX_SEED:  # what torch.Generator.manual_seed takes
        raise ConfigError(f"seed={seed} is not allowed: must be in [0, {MAX_SEED}]")
    if truncation is not None and not (math.isfinite(truncation) and truncation > 0):
        raise ConfigError(f"truncation={truncation} is not allowed: must be a finite number > 0")


def check_labels(labels: torch.Tensor | None, num_classes: int) -> None:
    if labels is None:
        return
    if num_classes == 0:
        raise ValueError("this generator is unconditional: it takes no class labels")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise ValueError(
            f"class label {int(bad[0])} is out of range: this generator knows classes 0..{num_classes - 1}"
        )


@torch.no_grad()
def sample(
    G: nn.Module,
    n: int,
    *,
    seed: int = 0,
    labels: torch.Tensor | int | None = None,
    truncation: float | None = None,
    batch: int = 500,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """n images from G on ``device`` (default: G's). ``labels``: one class for all, a
    tensor of n, or None (cycle through all classes for conditional G). Same seed, same images."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    device = torch.device(device) if device is not None else device_of(G)
    with one_thread(device):  # every torch call inside: see one_thread
        num_classes = G.num_classes
        if isinstance(labels, int):
            labels = torch.full((n,), labels, dtype=torch.long, device=device)
        elif labels is None and num_classes:
            labels = torch.arange(n, device=device) % num_classes
        elif labels is not None:
            labels = labels.to(device)
        check_labels(labels, num_classes)
        z = latents(n, G.z_dim, seed, truncation, device=device)
        chunks = [
            to_pixels(G(z[i : i + batch], None if labels is None else labels[i : i + batch]))
            for i in range(0, n, batch)
        ]
        images = to_numpy(torch.cat(chunks))
    return images, None if labels is None else labels.cpu().numpy()


_THREADS = threading.Lock()
"""Guards torch's thread setting and the two values below while CPU samplers come and go."""
_samplers = 0
_threads_outside = 1


@contextlib.contextmanager
def one_thread(device: torch.device | str = "cpu"):
    """Same seed, same pixels: one CPU thread fixes the order of every float sum, so a
    busy machine cannot shift a value across a uint8 rounding boundary. torch.set_num_threads
    sets the calling thread's count and a process-wide one that a thread copies at its first
    torch call. Concurrent callers (a model server's request threads) each set their own
    thread to 1 and, leaving, put back the count the process had before the first of them
    came: none saves another's 1 as the count to restore, which would leave threads started
    later at one thread for good."""
    global _samplers, _threads_outside
    if torch.device(device).type != "cpu":
        yield
        return
    with _THREADS:
        # Also makes a new thread copy the process's count now: copied later, once another
        # sampler has put it back, it would undo this thread's 1.
        threads = torch.get_num_threads()
        if _samplers == 0:
            _threads_outside = threads
        _samplers += 1
        torch.set_num_threads(1)
    try:
        yield
    finally:
        with _THREADS:
            _samplers -= 1
            torch.set_num_threads(_threads_outside)


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """uint8 N x C x H x W tensor -> N x H x W (C=1) or N x H x W x 3."""
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def class_grid(G: nn.Module, per_class: int = 10, seed: int = 0) -> tuple[np.ndarray, int]:
    """(images, columns): one row per class for conditional G, else a square grid."""
    if G.num_classes:
        labels = torch.arange(G.num_classes, device=device_of(G)).repeat_interleave(per_class)
        images, _ = sample(G, len(labels), seed=seed, labels=labels)
        return images, per_class
    n = per_class * per_class
    images, _ = sample(G, n, seed=seed)
    return images, per_class


@torch.no_grad()
def interpolation(G: nn.Module, steps: int = 10, rows: int = 4, seed: int = 0) -> tuple[np.ndarray, int]:
    """Spherical interpolation between pairs of latents, one row per pair (same class)."""
    device = device_of(G)
    z = latents(2 * rows, G.z_dim, seed, device=device)
    a, b = z[:rows], z[rows:]
    t = torch.linspace(0, 1, steps, device=device).view(1, steps, 1)
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    omega = torch.acos((an * bn).sum(1).clamp(-1 + 1e-6, 1 - 1e-6)).view(rows, 1, 1)
    path = (torch.sin((1 - t) * omega) * a.unsqueeze(1) + torch.sin(t * omega) * b.unsqueeze(1)) / torch.sin(omega)
    labels = (torch.arange(rows, device=device) % G.num_classes).repeat_interleave(steps) if G.num_classes else None
    images = to_pixels(G(path.reshape(rows * steps, -1), labels))
    return to_numpy(images), steps


def grid_image(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """Tile N images into one array, ``columns`` per row, with a dark border."""
    n = len(images)
    rows = math.ceil(n / columns)
    h, w = images.shape[1:3]
    shape = (rows * (h + pad) + pad, columns * (w + pad) + pad) + images.shape[3:]
    canvas = np.zeros(shape, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return canvas


def png_bytes(images: np.ndarray, columns: int, scale: int = 2) -> bytes:
    from PIL import Image

    canvas = grid_image(images, columns)
    picture = Image.fromarray(canvas)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def npz_bytes(images: np.ndarray, labels: np.ndarray | None) -> bytes:
    out = io.BytesIO()
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels.astype(np.int64)}
    np.savez_compressed(out, **arrays)
    return out.getvalue()
