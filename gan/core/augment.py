"""Differentiable augmentation for D's inputs (DiffAugment, Zhao et al. 2020).

Translation and a small cutout keep a digit a digit. For natural images, 'color' (brightness,
saturation, contrast) and 'flip' (left-right) are there too: flips only where the domain
allows them (not digits, text, arrows or flags). Random parameters come from an explicit
torch.Generator on the run's device, drawn for the *global* batch and sliced per rank, so
training does not depend on the number of workers.

AdaptiveAugment (StyleGAN2-ADA, Karras et al. 2020) is the general alternative: blits,
geometric and colour transforms, each taken with a probability p that AugmentController
raises while D grows sure of the real images (it memorises them) and lowers otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gan.core.config import ADA_GROUPS

TRANSLATE_RATIO = 1 / 12  # up to 2 px at 28x28: a digit stays the same digit
CUTOUT_RATIO = 0.15  # a 5x5 hole at 28x28: small enough to keep a digit readable


class DiffAugment:
    def __init__(self, policy: str, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> None:
        self.policies = [p.strip() for p in policy.split(",") if p.strip()]
        self.generator, self.rank, self.world_size = generator, rank, world_size

    def _draw(self, low: int, high: int, n: int) -> torch.Tensor:
        values = torch.randint(
            low, high, (n * self.world_size,), generator=self.generator, device=self.generator.device
        )
        return self._own(values, n)

    def _uniform(self, n: int) -> torch.Tensor:
        return self._own(torch.rand((n * self.world_size,), generator=self.generator, device=self.generator.device), n)

    def _own(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """This rank's n of the draws for the global batch."""
        return values[self.rank * n : (self.rank + 1) * n]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for policy in self.policies:
            if policy == "translation":
                x = translate(x, self._draw, TRANSLATE_RATIO)
            elif policy == "cutout":
                x = cutout(x, self._draw, CUTOUT_RATIO)
            elif policy == "color":
                x = color(x, self._uniform)
            else:
                x = flip(x, self._draw)
        return x


def translate(x: torch.Tensor, draw, ratio: float) -> torch.Tensor:
    n, _, h, w = x.shape
    p = max(1, int(h * ratio + 0.5))
    dy, dx = draw(-p, p + 1, n).to(x.device), draw(-p, p + 1, n).to(x.device)
    padded = F.pad(x, [p, p, p, p], mode="replicate")  # edge pixels: background stays background
    rows = (torch.arange(h, device=x.device).view(1, h) + p - dy.view(n, 1)).view(n, 1, h, 1)
    cols = (torch.arange(w, device=x.device).view(1, w) + p - dx.view(n, 1)).view(n, 1, 1, w)
    padded = padded.gather(2, rows.expand(n, x.shape[1], h, padded.shape[3]))
    return padded.gather(3, cols.expand(n, x.shape[1], h, w))


def cutout(x: torch.Tensor, draw, ratio: float) -> torch.Tensor:
    n, _, h, w = x.shape
    size = max(1, int(h * ratio + 0.5))
    cy, cx = draw(0, h, n).to(x.device), draw(0, w, n).to(x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((ys - cy.view(n, 1, 1)).abs() <= size // 2) & ((xs - cx.view(n, 1, 1)).abs() <= size // 2)
    # Fill with each image's darkest value (the background for digits) rather than grey.
    fill = x.amin(dim=(1, 2, 3), keepdim=True)
    return torch.where(inside.unsqueeze(1), fill, x)


def color(x: torch.Tensor, uniform) -> torch.Tensor:
    """DiffAugment's colour jitter on images in [-1, 1]: brightness, saturation, contrast."""
    n = x.shape[0]
    x = x + (uniform(n).to(x.device) - 0.5).view(n, 1, 1, 1)
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * (uniform(n).to(x.device) * 2).view(n, 1, 1, 1) + grey
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (uniform(n).to(x.device) + 0.5).view(n, 1, 1, 1) + mean


def flip(x: torch.Tensor, draw) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    mirrored = draw(0, 2, x.shape[0]).to(x.device).bool().view(-1, 1, 1, 1)
    return torch.where(mirrored, x.flip(3), x)


# --- Adaptive discriminator augmentation (StyleGAN2-ADA, Karras et al. 2020) ---------------
# The paper's 'bgc' pipeline (its appendix B): pixel blitting, general geometric and colour
# transforms, each applied to an image with the same probability p, which AugmentController
# steers from how sure D is of the real images. Ranges and distributions are the paper's.

BLIT_SHIFT = 0.125  # integer translation up to 1/8 of the side
SCALE_STD = 0.2  # log2 std of isotropic scaling
ANISO_STD = 0.2  # log2 std of anisotropic scaling
SHIFT_STD = 0.125  # std of fractional translation, in sides
BRIGHTNESS_STD = 0.2  # std of the offset added to every channel (images in [-1, 1])
CONTRAST_STD = 0.5  # log2 std of contrast
SATURATION_STD = 1.0  # log2 std of saturation
LUMA = torch.tensor([1.0, 1.0, 1.0, 0.0]) / 3**0.5  # the grey axis, homogeneous RGB


class AdaptiveAugment:
    """StyleGAN2-ADA's augmentation of every image D sees, each transform taken with probability ``p``.

    ``p`` is a 0-dim tensor on the generator's device, read without a host sync so that a
    captured CUDA graph sees each new value; an AugmentController updates it in place. At
    p = 0 the output is the input, exactly. Everything is differentiable in the images (G's
    gradient and R1 pass through). ``groups``: comma-separated from 'blit', 'geom', 'color'.
    ``flips``: x-flips and quarter turns among the blits, only for domains whose images stay
    valid mirrored or turned (never digits or emoji); they need square images.

    As in DiffAugment, every random number is drawn for the global batch from ``generator``
    and sliced for this rank, and the number of draws depends only on the images' shape,
    never on p.

    Departure from the paper: the geometric transform samples its input bilinearly with
    reflection at the border (one ``grid_sample``); StyleGAN2-ADA upsamples 2x with a sym6
    wavelet filter first, which aliases less.
    """

    def __init__(
        self,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
        *,
        p: torch.Tensor | None = None,
        groups: str = "blit,geom,color",
        flips: bool = False,
    ) -> None:
        self.generator, self.rank, self.world_size = generator, rank, world_size
        self.groups = [g.strip() for g in groups.split(",") if g.strip()]
        unknown = [g for g in self.groups if g not in ADA_GROUPS]
        if unknown:
            raise ValueError(f"unknown augmentation group(s) {unknown}; choose from {list(ADA_GROUPS)}")
        self.flips = flips
        self.p = torch.zeros((), device=generator.device) if p is None else p
        # Constants made here: a tensor copied from the host inside a CUDA graph capture fails.
        luma = LUMA.to(generator.device)
        self._grey = torch.outer(luma, luma)  # projection onto the grey axis
        cross = torch.zeros(4, 4)
        cross[0, 1], cross[0, 2], cross[1, 2] = -LUMA[2], LUMA[1], -LUMA[0]
        self._cross = (cross - cross.T).to(generator.device)  # v x (.), for rotations about the grey axis
        self._rgb = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0])).to(generator.device)

    # --- random draws for the global batch, this rank's share ---------------------------
    def _rand(self, n: int, *shape: int) -> torch.Tensor:
        g = self.generator
        values = torch.rand((n * self.world_size, *shape), generator=g, device=g.device)
        return values[self.rank * n : (self.rank + 1) * n]

    def _randn(self, n: int, *shape: int) -> torch.Tensor:
        g = self.generator
        values = torch.randn((n * self.world_size, *shape), generator=g, device=g.device)
        return values[self.rank * n : (self.rank + 1) * n]

    def _taken(self, n: int, p: torch.Tensor | None = None) -> torch.Tensor:
        """For each image, whether a transform applies: a Bernoulli(p) draw."""
        return self._rand(n) < (self.p if p is None else p)

    def _hue_rotation(self, angle: torch.Tensor) -> torch.Tensor:
        """Per-image 4x4 rotations of RGB by ``angle`` (n, 1, 1) about the grey axis (Rodrigues)."""
        homogeneous = torch.eye(4, device=angle.device) - self._rgb
        cos, sin = angle.cos(), angle.sin()
        return homogeneous + cos * self._rgb + sin * self._cross + (1 - cos) * self._grey

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if "blit" in self.groups:
            x = self._blit(x)
        if "geom" in self.groups:
            x = self._geom(x)
        if "color" in self.groups:
            x = self._color(x)
        return x

    # --- pixel blitting: exact moves of whole pixels --------------------------------------
    def _blit(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # Output pixel (i, j) as doubled, centred coordinates u = 2j - (w-1), v = 2i - (h-1):
        # integers, which mirrors and quarter turns about the centre map to integers.
        u = (2 * torch.arange(w, device=x.device) - (w - 1)).view(1, 1, w).expand(n, h, w)
        v = (2 * torch.arange(h, device=x.device) - (h - 1)).view(1, h, 1).expand(n, h, w)
        mirror = turns = None
        if self.flips:
            if h != w:
                raise ValueError(f"quarter turns need square images, these are {h}x{w}; pass flips=False")
            mirror = (self._taken(n) & (self._rand(n) < 0.5)).to(x.device).view(n, 1, 1)
            turns = torch.where(self._taken(n), (self._rand(n) * 4).floor(), 0).to(x.device).view(n, 1, 1)
        shift = (self._rand(n, 2) * 2 - 1) * BLIT_SHIFT
        shift = torch.where(self._taken(n).view(n, 1), shift, 0).to(x.device)
        # Walk back from an output pixel to its source: undo the shift, the turns, the mirror.
        u = u - 2 * (shift[:, 0] * w).round().long().view(n, 1, 1)
        v = v - 2 * (shift[:, 1] * h).round().long().view(n, 1, 1)
        if turns is not None:
            for k in range(3):
                turn = turns > k
                u, v = torch.where(turn, -v, u), torch.where(turn, u, v)
        if mirror is not None:
            u = torch.where(mirror, -u, u)
        rows, cols = _reflect((v + h - 1) // 2, h), _reflect((u + w - 1) // 2, w)
        index = (rows * w + cols).view(n, 1, h * w).expand(n, c, h * w)
        return x.flatten(2).gather(2, index).view(n, c, h, w)

    # --- general geometric transforms: one affine map per image ---------------------------
    def _geom(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        one = torch.ones(n, device=self.generator.device)
        # The inverse map, output pixel -> input pixel, in pixels about the centre: each
        # transform's inverse multiplied on the right, so they act on the image in this order.
        inverse = torch.eye(3, device=one.device).expand(n, 3, 3)
        taken = []

        def draw(value: torch.Tensor, identity: float, p: torch.Tensor | None = None) -> torch.Tensor:
            chosen = self._taken(n, p)
            taken.append(chosen)
            return torch.where(chosen.view(-1, *[1] * (value.ndim - 1)), value, identity)

        scale = draw(torch.exp2(self._randn(n) * SCALE_STD), 1.0)
        inverse = inverse @ _affine(1 / scale, 1 / scale)
        # Two rotations, each with probability 1 - sqrt(1 - p): some rotation with probability p.
        p_rotate = 1 - (1 - self.p).clamp(0, 1).sqrt()
        angle = draw((self._rand(n) * 2 - 1) * math.pi, 0.0, p_rotate)
        inverse = inverse @ _rotation(-angle)
        aniso = draw(torch.exp2(self._randn(n) * ANISO_STD), 1.0)
        inverse = inverse @ _affine(1 / aniso, aniso)
        angle = draw((self._rand(n) * 2 - 1) * math.pi, 0.0, p_rotate)
        inverse = inverse @ _rotation(-angle)
        shift = draw(self._randn(n, 2) * SHIFT_STD, 0.0)
        inverse = inverse @ _affine(one, one, -shift[:, 0] * w, -shift[:, 1] * h)
        # affine_grid (align_corners=False) takes coordinates where the image spans [-1, 1].
        theta = _affine(one * (2 / w), one * (2 / h)) @ inverse @ _affine(one * (w / 2), one * (h / 2))
        # Sampling positions in at least float32: in bfloat16 they would miss by a fraction of a pixel.
        dtype = torch.promote_types(x.dtype, torch.float32)
        grid = F.affine_grid(theta[:, :2].to(x.device, dtype), [n, c, h, w], align_corners=False)
        moved = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        # Images left alone skip the resampling, so p = 0 returns the input exactly.
        any_taken = torch.stack(taken).any(0).to(x.device).view(n, 1, 1, 1)
        return torch.where(any_taken, moved.to(x.dtype), x)

    # --- colour: one 4x4 matrix per image on homogeneous RGB ----------------------------------
    def _color(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        if c not in (1, 3):
            raise ValueError(f"colour augmentation needs RGB or grey images, these have {c} channels")
        device = self.generator.device
        eye, grey = torch.eye(4, device=device), self._grey
        zero, one = torch.zeros(n, device=device), torch.ones(n, device=device)
        matrix = eye.expand(n, 4, 4)
        taken = []

        def draw(value: torch.Tensor, identity: float) -> torch.Tensor:
            chosen = self._taken(n)
            taken.append(chosen)
            return torch.where(chosen, value, identity).view(n, 1, 1)

        brightness = draw(self._randn(n) * BRIGHTNESS_STD, 0.0).view(n)
        matrix = _affine3d(one, one, one, brightness, brightness, brightness) @ matrix
        contrast = draw(torch.exp2(self._randn(n) * CONTRAST_STD), 1.0).view(n)
        matrix = _affine3d(contrast, contrast, contrast, zero, zero, zero) @ matrix
        flip = draw((self._rand(n) * 2).floor(), 0.0)  # a Householder reflection of the grey axis
        matrix = (eye - 2 * grey * flip) @ matrix
        if c == 3:  # hue and saturation move colours off the grey axis: RGB only
            hue = draw((self._rand(n) * 2 - 1) * math.pi, 0.0)
            matrix = self._hue_rotation(hue) @ matrix
            saturation = draw(torch.exp2(self._randn(n) * SATURATION_STD), 1.0)
            matrix = (grey + (eye - grey) * saturation) @ matrix
        matrix = matrix.to(x.device, x.dtype)
        if c == 3:
            coloured = torch.einsum("nij,njhw->nihw", matrix[:, :3, :3], x) + matrix[:, :3, 3].view(n, 3, 1, 1)
        else:  # a grey pixel is (g, g, g): the mean of the transformed channels
            gain, offset = matrix[:, :3, :3].sum(2).mean(1), matrix[:, :3, 3].mean(1)
            coloured = x * gain.view(n, 1, 1, 1) + offset.view(n, 1, 1, 1)
        any_taken = torch.stack(taken).any(0).to(x.device).view(n, 1, 1, 1)
        return torch.where(any_taken, coloured.to(x.dtype), x)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices up to size-1 outside [0, size) mirrored back in, the edge pixel not repeated."""
    index = torch.where(index < 0, -index, index)
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def _affine(sx: torch.Tensor, sy: torch.Tensor, tx=0.0, ty=0.0) -> torch.Tensor:
    """Per-image 3x3 matrices [[sx, 0, tx], [0, sy, ty], [0, 0, 1]]."""
    zero, one = torch.zeros_like(sx), torch.ones_like(sx)
    tx, ty = zero + tx, zero + ty
    rows = [sx, zero, tx, zero, sy, ty, zero, zero, one]
    return torch.stack(rows, -1).view(-1, 3, 3)


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([cos, -sin, zero, sin, cos, zero, zero, zero, one], -1).view(-1, 3, 3)


def _affine3d(sx, sy, sz, tx, ty, tz) -> torch.Tensor:
    zero, one = torch.zeros_like(sx), torch.ones_like(sx)
    rows = [sx, zero, zero, tx, zero, sy, zero, ty, zero, zero, sz, tz, zero, zero, zero, one]
    return torch.stack(rows, -1).view(-1, 4, 4)


class AugmentController:
    """Sets AdaptiveAugment's p: from D's overfitting (ADA) or on a schedule of images seen.

    ADA (Karras et al. 2020, section 3): r_t = E[sign(D(real))] over the last ``interval``
    steps. Every ``interval`` steps p moves by sign(r_t - target) * images / (speed_kimg * 1000),
    where images is the global batch times ``interval``: at the paper's speed, 500 kimg, p can
    go from 0 to 1 in 500k images. It stays in [0, 1]. With ``schedule`` (a function of images
    seen) p is set from it every step instead; with neither, p keeps the value it was given.
    r_t is measured in every mode, for logging.

    The loop calls ``observe(real_logits)`` once per D update on that update's logits for
    real images (device ops only: may run inside a captured graph), and ``step(images_seen)``
    after every training step, outside any graph. ``all_gather`` (the loop's) pools the signs
    of every rank, so p is the same everywhere and N workers move it like one.
    """

    def __init__(
        self,
        p: torch.Tensor,
        batch_images: int,
        *,
        target: float | None = 0.6,
        speed_kimg: float = 500.0,
        interval: int = 4,
        schedule: Callable[[int], float] | None = None,
        all_gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ) -> None:
        if target is not None and schedule is not None:
            raise ValueError("give either an ADA target or a schedule for p, not both")
        if target is not None and not 0 < target < 1:
            raise ValueError(f"the ADA target is a mean sign of D on reals, in (0, 1); got {target}")
        if speed_kimg <= 0 or interval < 1 or batch_images < 1:
            raise ValueError(
                f"speed_kimg ({speed_kimg}) must be > 0, interval ({interval}) and batch_images ({batch_images}) >= 1"
            )
        self.p, self.batch_images = p, batch_images
        self.target, self.speed_kimg, self.interval = target, speed_kimg, interval
        self.schedule, self.all_gather = schedule, all_gather
        self.rt = torch.zeros((), device=p.device)
        self._sign_sum = torch.zeros((), device=p.device)
        self._count = torch.zeros((), device=p.device)
        self._steps = 0  # since the last adjustment

    def observe(self, real_logits: torch.Tensor) -> None:
        """Add one D update's logits on real images to the running mean sign."""
        self._sign_sum.add_(real_logits.detach().float().sign().sum())
        self._count.add_(real_logits.numel())

    def step(self, images_seen: int = 0) -> None:
        """After each training step: every ``interval`` steps r_t is read and, for ADA, p moved."""
        if self.schedule is not None:
            self.p.fill_(min(max(float(self.schedule(images_seen)), 0.0), 1.0))
        self._steps += 1
        if self._steps < self.interval:
            return
        self._steps = 0
        pooled = self.all_gather(torch.stack([self._sign_sum, self._count]).unsqueeze(0)).sum(0)
        seen = pooled[1] > 0  # no D update in the interval: r_t and p stay as they were
        self.rt.copy_(torch.where(seen, pooled[0] / pooled[1].clamp(min=1), self.rt))
        if self.target is not None:
            adjust = torch.sign(self.rt - self.target) * (self.batch_images * self.interval) / (self.speed_kimg * 1000)
            self.p.copy_(torch.where(seen, self.p + adjust, self.p).clamp(0, 1))
        self._sign_sum.zero_()
        self._count.zero_()

    def stats(self) -> dict[str, torch.Tensor]:
        """p and the last r_t, as device tensors, for the loop's statistics (rank 0 logs them)."""
        return {"augment/p": self.p.detach().clone(), "augment/rt": self.rt.clone()}

    def state_dict(self) -> dict:
        return {
            "p": self.p.detach().clone(),
            "rt": self.rt.clone(),
            "sign_sum": self._sign_sum.clone(),
            "count": self._count.clone(),
            "steps": self._steps,
        }

    def load_state_dict(self, state: dict, interval: bool = True) -> None:
        """Copies into the existing tensors, so a captured graph keeps reading them. Without
        ``interval`` the signs gathered since the last adjustment are dropped and a new
        interval starts (p and r_t are kept)."""
        self.p.copy_(state["p"])
        self.rt.copy_(state["rt"])
        self._sign_sum.copy_(state["sign_sum"] if interval else torch.zeros_like(self._sign_sum))
        self._count.copy_(state["count"] if interval else torch.zeros_like(self._count))
        self._steps = int(state["steps"]) if interval else 0
