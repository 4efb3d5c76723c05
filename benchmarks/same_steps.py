"""The sha256 of every preset's networks after a few seeded training steps: run it before and
after a change that must not change training (a refactor, an option that stays off), and
compare. Digit presets train on the embedded digits, RGB presets on seeded random images of
their resolution (the maths, not the data, is what is compared), each at batch 16.

  python benchmarks/same_steps.py              # every preset but the -gpu ones, 12 steps
  python benchmarks/same_steps.py --steps 4 dcgan dcgan-64
"""

from __future__ import annotations

import argparse
import hashlib

import torch

from gan.core.config import PRESETS, override, preset
from gan.core.loop import GANLoop, Nets, make_ema
from gan.core.models import build_models
from gan.data.datasets import ImageDataset, load_dataset


def data_for(cfg):
    if cfg.data.channels == 1 and cfg.data.resolution == 28:
        return load_dataset(cfg.data)
    g = torch.Generator().manual_seed(0)
    side = cfg.data.resolution
    images = torch.randint(0, 256, (256, cfg.data.channels, side, side), generator=g, dtype=torch.uint8)
    labels = torch.arange(256) % 10 if cfg.model.num_classes else None
    return ImageDataset(images, labels, "random", "random")


def digest(name: str, steps: int) -> str:
    cfg = override(preset(name), ["train.batch_size=16", "train.seed=0", "eval.every_kimg=10"])
    torch.manual_seed(0)
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)
    loop = GANLoop(cfg, Nets(G, D, make_ema(G), G, D), data_for(cfg))
    for _ in range(steps):
        loop.train_step()
    h = hashlib.sha256()
    for net in (G, D, loop.nets.G_ema):
        for value in net.state_dict().values():
            h.update(value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cpu_sized = [name for name in PRESETS if not name.endswith("-gpu")]
    parser.add_argument("presets", nargs="*", default=cpu_sized, help="default: every preset but the -gpu ones")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: the same summation order on any machine's core count
    for name in args.presets:
        print(f"{name:14s} {digest(name, args.steps)}", flush=True)


if __name__ == "__main__":
    main()
