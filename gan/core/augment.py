"""Differentiable augmentation for D's inputs (DiffAugment, Zhao et al. 2020).

Translation and a small cutout keep a digit a digit. For natural images, 'color' (brightness,
saturation, contrast) and 'flip' (left-right) are there too: flips only where the domain
allows them (not digits, text, arrows or flags). Random parameters come from an explicit
torch.Generator on the run's device, drawn for the *global* batch and sliced per rank, so
training does not depend on the number of workers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
