"""Several EMA half-lives from one training run, in-process.

The average of G's weights does not feed back into training, so one run can carry more
averages beside its own, copy them all at set training times, and score the copies when
training is over (outside the time budget) with the run's own evaluator.
    python benchmarks/ema_screen.py --preset dcgan-64 --seconds 1800 --at 600,1200 \\
        --half-lives 3,10,30 --set data.uri=$GAN_BENCH_CACHE/emoji-twitter-64 --set train.seed=0
Prints one JSON line: the run's own evaluation history, and for each copy time the kimg and
FID, precision and recall of G itself, of the run's EMA and of each extra average (with
--grids, a sample grid of the run's EMA at each copy time). The
extra averages cost a little speed (one more update per average per step), so the run sees
a few percent fewer images than the preset alone would in the same time.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

from gan.core.config import override, preset
from gan.core.loop import ema_beta, make_ema, update_ema
from gan.core.sampling import class_grid, png_bytes
from gan.runs.session import LocalSession
from gan.runs.trainer import Trainer

SCORES = ("fid", "fid_floor", "precision", "recall", "class_accuracy", "class_variety")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="dcgan-64")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seconds", type=float, required=True, help="training-time budget (evaluation excluded)")
    parser.add_argument("--at", default="", help="comma-separated training seconds to copy at (the end always)")
    parser.add_argument(
        "--half-lives", default="3,10,30", help="extra EMA half-lives in kimg, comma-separated ('' = none)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grids", help="write a sample grid of each copy of the run's own EMA into this folder")
    args = parser.parse_args()
    half_lives = [float(h) for h in args.half_lives.split(",") if h]
    at = sorted(float(s) for s in args.at.split(",") if s)
    if any(h <= 0 for h in half_lives) or any(not 0 < s < args.seconds for s in at):
        parser.error("half-lives must be positive and --at times inside (0, --seconds)")
    if args.grids and not Path(args.grids).is_dir():
        parser.error(f"--grids {args.grids}: no such folder")
    cfg = override(
        preset(args.preset),
        # The time is the budget: a fast preset must not stop early at the preset's image count.
        [
            *args.overrides,
            f"train.time_budget_s={args.seconds}",
            "train.total_kimg=1e9",
            f"train.threads={args.threads}",
        ],
    )
    with tempfile.TemporaryDirectory(prefix="gan-ema-") as tmp:
        trainer = Trainer(cfg, LocalSession(tmp, quiet=True))
        averages = ExtraAverages(trainer, half_lives, at)
        history = trainer.train().history
        averages.take()
        scored = [
            {"train_s": taken["train_s"], "kimg": taken["kimg"]}
            | {name: score(trainer, G) for name, G in taken["nets"].items()}
            for taken in averages.copies
        ]
        if args.grids:
            for taken in averages.copies:
                own = next(G for name, G in taken["nets"].items() if name.endswith("(run's)"))
                images, columns = class_grid(own, per_class=10)
                name = f"{cfg.name}_seed{cfg.train.seed}_{taken['train_s']:.0f}s.png"
                (Path(args.grids) / name).write_bytes(png_bytes(images, columns, scale=1))
    own = [{k: h[k] for k in ("kimg", "fid", "precision", "recall", "time/train_s") if k in h} for h in history]
    print(json.dumps({"preset": cfg.name, "ema_half_life_kimg": cfg.train.ema_half_life_kimg, "history": own,
                      "copies": scored}))  # fmt: skip
    return 0


def score(trainer: Trainer, G) -> dict[str, float]:
    scores = trainer.evaluator(G, trainer.cfg.model.num_classes)
    return {k: round(v, 4) for k, v in scores.items() if k in SCORES}


class ExtraAverages:
    """One more EMA of G per half-life, updated after every step of ``trainer``; G and every
    average are copied at the first step past each of ``at`` seconds of training."""

    def __init__(self, trainer: Trainer, half_lives: list[float], at: list[float]) -> None:
        self.trainer = trainer
        loop, G = trainer.loop, trainer.nets.G
        self.emas = {h: make_ema(G) for h in half_lives}
        betas = {h: ema_beta(loop.global_batch, h) for h in half_lives}
        self.copies: list[dict] = []
        pending = list(at)
        step = loop.train_step

        def step_and_average() -> None:
            step()
            for h, ema in self.emas.items():
                update_ema(ema, G, betas[h], foreach=True)
            while pending and trainer.train_time_s >= pending[0]:
                pending.pop(0)
                self.take()

        loop.train_step = step_and_average

    def take(self) -> None:
        nets = self.trainer.nets
        named = {"G": nets.G, f"ema {self.trainer.cfg.train.ema_half_life_kimg:g} (run's)": nets.G_ema}
        named |= {f"ema {h:g}": ema for h, ema in self.emas.items()}
        self.copies.append(
            {
                "train_s": round(self.trainer.train_time_s, 1),
                "kimg": round(self.trainer.loop.images_seen / 1000, 1),
                "nets": {name: copy.deepcopy(G).eval() for name, G in named.items()},
            }
        )


if __name__ == "__main__":
    raise SystemExit(main())
