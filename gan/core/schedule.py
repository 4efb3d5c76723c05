"""The settings a run trains with after a number of images: its config, moved along
``cfg.schedule`` (R3GAN's half-cosine schedules, Huang et al. 2024). Pure functions of the
images seen, so a resumed run takes up its schedules exactly where it left them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gan.core.config import Config


def cosine(start: float, end: float, images_seen: float, kimg: float) -> float:
    """From ``start`` to ``end`` along a half cosine over ``kimg`` thousand images, then ``end``;
    ``start`` throughout when ``kimg`` is 0."""
    if kimg <= 0:
        return start
    done = min(images_seen / (kimg * 1000.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * done))


def ramp(end: float, images_seen: float, kimg: float) -> float:
    """From 0 to ``end`` in a straight line over ``kimg`` thousand images, then ``end``;
    ``end`` throughout when ``kimg`` is 0 (adaptive augmentation's fixed p, loss.ada_ramp_kimg)."""
    if kimg <= 0:
        return end
    return end * min(images_seen / (kimg * 1000.0), 1.0)


@dataclass(frozen=True, slots=True)
class Settings:
    """What the loop trains with now (before ``optim.lr_decay_start``'s linear share)."""

    lr_g: float
    lr_d: float
    beta1: float
    beta2: float
    gamma_scale: float
    """The share of loss.r1_gamma and loss.r2_gamma the penalties take."""
    ema_half_life_kimg: float


def settings_at(cfg: Config, images_seen: float) -> Settings:
    """``cfg``'s optimiser, penalty and EMA settings after ``images_seen`` images."""
    s, optim, half_life = cfg.schedule, cfg.optim, cfg.train.ema_half_life_kimg
    lr_share = cosine(1.0, s.lr_final, images_seen, s.kimg)
    return Settings(
        lr_g=optim.lr_g * lr_share,
        lr_d=optim.lr_d * lr_share,
        beta1=optim.beta1,
        beta2=cosine(optim.beta2, s.beta2_final or optim.beta2, images_seen, s.kimg),
        gamma_scale=cosine(1.0, s.gamma_final, images_seen, s.kimg),
        ema_half_life_kimg=cosine(half_life, s.ema_half_life_final_kimg or half_life, images_seen, s.kimg),
    )
