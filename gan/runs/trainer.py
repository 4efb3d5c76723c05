"""Builds a run from a Config and drives it: steps, evaluation, snapshots, progress.

Framework-free: what differs between an in-process run and a Ray Train worker (DDP
wrapping, gradient reduction, where checkpoints and metrics go) sits behind a
``Session`` (gan/runs/session.py): in-process, or a Ray Train worker.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from gan.core.config import MUTABLE, Config, TrainConfig, override
from gan.core.loop import GANLoop, Nets, lr_scale, make_ema
from gan.core.models import build_models
from gan.core.sampling import class_grid, png_bytes
from gan.data.datasets import Dataset, check_class_count, load_dataset
from gan.evaluation.backbone import evaluator_uri
from gan.evaluation.evaluator import Evaluator
from gan.registry.tracking import NullTracker, Tracker
from gan.runs import checkpoint
from gan.runs.session import Session, Snapshot
from gan.sweeps.population import Exploit


def configure_backends(train: TrainConfig, device: torch.device) -> None:
    """TF32 and cuDNN autotuning, on CUDA only: CPU runs keep torch's settings."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = train.tf32
    torch.backends.cudnn.allow_tf32 = train.tf32
    torch.backends.cudnn.benchmark = train.cudnn_benchmark


@dataclass
class Result:
    step: int
    images_seen: int
    best_fid: float
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class StallWatch:
    """Says once when D has stopped learning: log after log it scores real and generated
    images alike while G's gradient has all but vanished. Nothing fails then, but the
    samples stop improving, and a user watching only the losses would not know why."""

    logs: int = 3
    """Consecutive logs that must look stalled."""
    gap: float = 0.01
    """Largest |d/real - d/fake| that counts as scoring them alike."""
    grad: float = 0.01
    """Largest G gradient norm that counts as vanished."""
    streak: int = 0
    said: bool = False

    def __call__(self, step: int, stats: dict[str, float]) -> str | None:
        """A one-line warning the first time the stall has lasted ``logs`` logs; else None."""
        if "grad_norm/g" not in stats:
            return None
        gap, grad = abs(stats["d/real"] - stats["d/fake"]), stats["grad_norm/g"]
        self.streak = self.streak + 1 if gap < self.gap and grad < self.grad else 0
        if self.streak < self.logs or self.said:
            return None
        self.said = True
        return (
            f"warning: D has stopped learning (step {step}: |d/real - d/fake| {gap:.4f}, grad_norm/g {grad:.4f} "
            f"for {self.logs} logs in a row), so G gets no signal and samples will not improve; "
            "a shallower D (model.depth) may train"
        )


class Trainer:
    def __init__(
        self, cfg: Config, session: Session, data: Dataset | None = None, tracker: Tracker | None = None
    ) -> None:
        self.cfg, self.session = cfg, session
        self.tracker = tracker or NullTracker()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.data = data if data is not None else load_dataset(cfg.data)
        check_class_count(cfg.model.num_classes, self.data.source, self.data.num_classes)
        # Per-rank seed for anything outside the loop's shared generator.
        torch.manual_seed(cfg.train.seed * session.world_size + session.rank)
        configure_backends(cfg.train, session.device)
        # Built on the CPU, then moved: the same seed gives the same initial weights on any device.
        with torch.device("cpu"):
            G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.preserve_format
        G = G.to(session.device, memory_format=memory_format)
        D = D.to(session.device, memory_format=memory_format)
        G_train = session.wrap(G, sync_batchnorm=cfg.train.sync_batchnorm)
        D_train = session.wrap(D, sync_batchnorm=cfg.train.sync_batchnorm)
        D_reg = None
        if cfg.train.compile:
            D_reg = D_train  # R1 and the gradient penalty differentiate twice: compiled graphs cannot
            # Spectral norm makes a new class per D, so every Trainer in a process adds graphs;
            # past the recompile limit dynamo runs eager and a resumed run stops matching.
            torch.compiler.reset()
            G_train, D_train = torch.compile(G_train), torch.compile(D_train)
        # After wrapping: DDP has broadcast rank 0's weights, so every rank's EMA starts equal.
        self.nets = Nets(G=G, D=D, G_ema=make_ema(G), G_train=G_train, D_train=D_train, D_reg=D_reg)
        self.loop = GANLoop(
            cfg,
            self.nets,
            self.data,
            rank=session.rank,
            world_size=session.world_size,
            all_gather=session.all_gather,
            device=session.device,
        )
        self.evaluator = Evaluator(cfg.eval, self.data, session.device, cfg.data.fsspec_options())
        self.best_fid = math.inf
        self.best_G_ema: dict | None = None
        self.history: list[dict[str, float]] = []
        self.train_time_s = 0.0
        self.lineage: list[str] = []
        """The PBT exploits this run took, oldest first."""
        self.stall = StallWatch()
        restored = session.restore()
        resumed: dict[str, str] = {}
        if restored is not None:
            state, where = restored
            # Also on the run itself: a worker's printed line can be lost on its way to the driver.
            resumed = {"resumed_from": f"{where} (step {state['loop']['step']})"}
            if session.rank == 0:  # before loading: a refusal then follows the checkpoint it names
                print(f"resuming from {resumed['resumed_from']}", flush=True)
            self._load(state)
        self.tracker.log_params(cfg.flat())
        self.tracker.set_tags(
            {
                "dataset_fingerprint": self.data.fingerprint,
                "evaluator_sha256": self.evaluator.sha256,
                "world_size": session.world_size,
                "device": str(session.device),
                **resumed,
            }
        )
        self.tracker.log_dict(cfg.to_dict(), "config.json")
        self._log_inputs()
        self.tracker.describe(self.description())
        self.tracker.backfill(self.history)

    def _log_inputs(self) -> None:
        data, ev = self.data, self.cfg.eval
        name = data.source.rstrip("/").rsplit("/", 1)[-1].removeprefix("embedded:") or data.source
        shape = list(data.shape)
        # MLflow keeps 36 characters of a digest: the full fingerprint is in the tags and the profile.
        profile = {"count": len(data), "shape": shape, "classes": data.num_classes, "fingerprint": data.fingerprint}
        self.tracker.log_dataset(name, data.fingerprint[:32], data.source, "training", profile)
        evaluator = ev.backbone_uri.rstrip("/").rsplit("/", 1)[-1] if ev.backbone_uri else ev.backbone
        # The user's file (eval.backbone_uri), the one beside the data, or the committed digit classifier.
        source = evaluator_uri(ev, data.source) if ev.backbone != "digits" else "gan/assets (digits classifier)"
        profile = {"sha256": self.evaluator.sha256, "num_samples": ev.num_samples, "floor": self.evaluator.floor}
        self.tracker.log_dataset(f"evaluator:{evaluator}", self.evaluator.sha256[:32], source, "evaluation", profile)

    def description(self) -> str:
        """One paragraph for the run page: what trained on what, for how long, and how well."""
        cfg, t, m = self.cfg, self.cfg.train, self.cfg.model
        budget = f"{t.total_kimg:g} kimg" + (f" or {t.time_budget_s:g} s of training" if t.time_budget_s else "")
        kind = f"class-conditional ({m.num_classes} classes)" if m.num_classes else "unconditional"
        text = (
            f"{cfg.name} preset: {kind} {m.family} GAN at {cfg.data.resolution} px, batch {t.batch_size} on "
            f"{self.session.world_size} worker(s) ({self.session.device.type}), trained on {self.data.source} "
            f"({len(self.data):,} images, fingerprint {self.data.fingerprint[:12]}), budget {budget}; "
            f"FID on {cfg.eval.num_samples:,} samples of the EMA generator with the {cfg.eval.backbone} "
            f"evaluator (floor {self.evaluator.floor:.2f})."
        )
        if self.history:
            last = self.history[-1]
            text += (
                f" After {last['kimg']:.1f} kimg ({last['time/train_s']:.0f} s): FID {last['fid']:.2f}, "
                f"best {self.best_fid:.2f}."
            )
        return text

    # --- state ----------------------------------------------------------------------
    def _load(self, state: dict[str, Any]) -> None:
        checkpoint.check_compatible(state, self.cfg)
        if state["dataset_fingerprint"] != self.data.fingerprint:
            raise checkpoint.CheckpointError(
                f"checkpoint was trained on dataset {state['dataset_fingerprint'][:12]}, "
                f"this run loads {self.data.fingerprint[:12]} ({self.data.source})"
            )
        if state.get("evaluator_sha256", self.evaluator.sha256) != self.evaluator.sha256:
            raise checkpoint.CheckpointError(
                f"checkpoint was scored by evaluator {state['evaluator_sha256'][:12]}, this run by "
                f"{self.evaluator.sha256[:12]}: its best FID would not compare; resume with that evaluator"
            )
        self.loop.load_state_dict(state["loop"])
        torch.set_rng_state(state["torch_rng"])
        self.best_fid = float(state["best_fid"])
        self.best_G_ema = state.get("best_G_ema")  # absent from checkpoints written before it was kept
        self.history = list(state["history"])
        self.train_time_s = float(state["train_time_s"])
        self.lineage = list(state.get("lineage", []))
        if self.lineage:  # PBT changed its settings: they, not the trial's sampled ones, go on
            saved = checkpoint.config_of(state).flat()
            self._set_hyperparameters({key: saved[key] for key in MUTABLE})

    def _set_hyperparameters(self, values: dict[str, Any]) -> None:
        self.cfg = override(self.cfg, [f"{key}={value}" for key, value in values.items()])
        self.loop.set_hyperparameters(self.cfg)

    def _continue_from(self, exploit: Exploit, state: dict[str, Any]) -> None:
        """PBT's exploit and explore: the donor's full training state, then new settings
        on the restored optimizers. This run keeps its own history and best generator."""
        if state["dataset_fingerprint"] != self.data.fingerprint:
            raise checkpoint.CheckpointError(f"{exploit.checkpoint} was trained on another dataset")
        checkpoint.check_compatible(state, self.cfg, exploit.checkpoint)
        self.loop.load_state_dict(state["loop"])
        self._set_hyperparameters(exploit.params)
        self.lineage.append(exploit.describe())
        self.tracker.set_tags(
            {f"pbt.exploit.{len(self.lineage)}": exploit.describe(), "pbt.exploits": len(self.lineage)}
        )
        if self.session.rank == 0:
            print(f"  PBT: continuing {exploit.describe()}", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "loop": self.loop.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "config": self.cfg.to_json(),
            "dataset_fingerprint": self.data.fingerprint,
            "evaluator_sha256": self.evaluator.sha256,
            "best_fid": self.best_fid,
            # The best evaluation's EMA weights: the run's generator_best, after any restart.
            "best_G_ema": self.best_G_ema,
            "history": self.history,
            "train_time_s": self.train_time_s,
            "lineage": self.lineage,
        }

    # --- running --------------------------------------------------------------------
    def _over_time(self) -> bool:
        """Whether the time budget is spent; every rank must stop at the same step, so the
        ranks agree on it (one all-reduce, at logging steps only)."""
        t = self.cfg.train
        over = t.time_budget_s > 0 and self.train_time_s >= t.time_budget_s
        flag = torch.full((1,), float(over), device=self.session.device)
        return bool(self.session.reduce_mean(flag).item() > 0)

    def _decay_learning_rates(self) -> dict[str, float]:
        """Sets the learning rates' share for how far the run is through its budget (images
        or training seconds, whichever is further along; the seconds agreed over ranks, one
        all-reduce at logging steps), and returns it for the logs; nothing without a decay."""
        decay_start = self.cfg.optim.lr_decay_start
        if decay_start >= 1:
            return {}
        seconds = torch.full((1,), self.train_time_s, device=self.session.device)
        done = self._share_done(self.session.reduce_mean(seconds).item())
        self.loop.scale_learning_rates(lr_scale(done, decay_start))
        return {"optim/lr_scale": self.loop.lr_scale}

    def _share_done(self, train_s: float) -> float:
        """How far through its budget the run is: images or training seconds, whichever is further along."""
        t = self.cfg.train
        done = self.loop.images_seen / (t.total_kimg * 1000)
        return max(done, train_s / t.time_budget_s) if t.time_budget_s else done

    def _steps_left(self, seconds_per_step: float) -> int:
        """Steps until the time budget is spent at the current pace, agreed over ranks (one
        all-reduce, at logging steps): the run then stops at that step without checking
        again, instead of overshooting by up to a logging interval."""
        left = (self.cfg.train.time_budget_s - self.train_time_s) / max(seconds_per_step, 1e-9)
        agreed = self.session.reduce_mean(torch.full((1,), left, device=self.session.device)).item()
        return max(0, math.floor(agreed))

    def evaluate(self, stats: dict[str, float], img_per_s: float) -> dict[str, float]:
        # BN running stats differ per rank without SyncBatchNorm; average them so every rank scores the same G_ema.
        for buffer in self.nets.G_ema.buffers():
            if buffer.is_floating_point():
                buffer.copy_(self.session.reduce_mean(buffer.detach()))
        start = time.monotonic()
        scores = self.evaluator(
            self.nets.G_ema,
            self.cfg.model.num_classes,
            rank=self.session.rank,
            world_size=self.session.world_size,
            gather=self.session.all_gather,
        )
        eval_s = time.monotonic() - start
        improved = scores["fid"] < self.best_fid
        self.best_fid = min(self.best_fid, scores["fid"])
        if improved:
            self.best_G_ema = {k: v.detach().clone() for k, v in self.nets.G_ema.state_dict().items()}
        metrics = {
            **scores,
            "best_fid": self.best_fid,
            "step": self.loop.step,
            "images_seen": self.loop.images_seen,
            "kimg": self.loop.images_seen / 1000,
            "time/train_s": self.train_time_s,
            "time/eval_s": eval_s,
            "throughput/img_per_s": img_per_s,
            **stats,
        }
        if self.session.in_population:  # the settings now, and the jumps, for the sweep's table and plot
            flat = self.cfg.flat()
            metrics |= {f"hparam/{key}": flat[key] for key in MUTABLE} | {"pbt/exploits": len(self.lineage)}
        self.history.append({k: float(v) for k, v in metrics.items()})
        images, columns = class_grid(self.nets.G_ema, per_class=10)
        meta = {k: metrics[k] for k in ("step", "images_seen", "fid", "best_fid", "fid_floor", "kid")}
        meta |= {"dataset_fingerprint": self.data.fingerprint, "evaluator_sha256": self.evaluator.sha256}
        snapshot = Snapshot(self.state_dict(), meta, png_bytes(images, columns), improved)
        self.session.report(metrics, snapshot)
        if self.session.rank == 0 and not self.session.quiet:
            print(evaluation_line(metrics, improved), flush=True)
        # After the checkpoint: a crash in between loses a log line, never duplicates one.
        self.tracker.log_metrics(metrics, step=self.loop.images_seen)
        self.tracker.log_image(snapshot.grid_png, key="samples", step=self.loop.images_seen)
        self.tracker.describe(self.description())  # so far: a run stopped early keeps its result too
        return metrics

    def train(self) -> Result:
        """Train to the budget; the tracked run ends FINISHED, FAILED or KILLED."""
        with self.tracker:
            result = self._train()
            # Models are logged before the run is closed FINISHED, so a finished run always has them.
            self.tracker.log_generator(self.nets.G_ema.state_dict(), self.cfg.to_json(), "generator")
            if self.best_G_ema is not None:
                self.tracker.log_generator(self.best_G_ema, self.cfg.to_json(), "generator_best")
        return result

    def _train(self) -> Result:
        """Steps run without waiting for the device; logging and evaluation steps read the
        statistics (a sync point), and only then are the seconds of training counted."""
        cfg = self.cfg
        every_img = cfg.eval.every_kimg * 1000
        total_img = cfg.train.total_kimg * 1000
        next_eval = (math.floor(self.loop.images_seen / every_img) + 1) * every_img
        window_start, window_images = time.monotonic(), 0
        stats: dict[str, float] = {}
        img_per_s = 0.0
        evaluated_at = self.loop.images_seen if self.history else -1
        budget = cfg.train.time_budget_s > 0
        stop_step = self.loop.step if budget and self._over_time() else math.inf
        self._decay_learning_rates()  # a resumed run continues at its share
        if self.history and self.session.in_population:  # restarted: an exploit after that round may be lost
            self._ask_population(self.history[-1])
        tick = time.monotonic()
        # The pace that sets the last steps is this process's average: one slow logging
        # interval (another process's burst on a shared machine) would otherwise end the run early.
        first_step, time_before = self.loop.step, self.train_time_s
        while self.loop.images_seen < total_img and self.loop.step < stop_step:
            self.loop.train_step()
            window_images += cfg.train.batch_size * cfg.optim.d_steps
            log_now = self.loop.step % cfg.train.log_every_steps == 0
            eval_now = self.loop.images_seen >= next_eval
            if not (log_now or eval_now):
                continue
            stats = self.loop.read_stats()  # waits for the device: the seconds up to here are training
            self.train_time_s += time.monotonic() - tick
            if log_now:
                img_per_s = window_images / max(time.monotonic() - window_start, 1e-9)
                window_start, window_images = time.monotonic(), 0
                stats |= self._decay_learning_rates()
                self._progress(stats, img_per_s)
                if not eval_now:  # an evaluation logs them with its metrics
                    self.tracker.log_curves({**stats, "throughput/img_per_s": img_per_s}, self.loop.images_seen)
                if budget and stop_step == math.inf:
                    pace = (self.train_time_s - time_before) / (self.loop.step - first_step)
                    steps_left = self._steps_left(pace)
                    if steps_left < cfg.train.log_every_steps:
                        stop_step = self.loop.step + steps_left
            if eval_now:
                metrics = self.evaluate(stats, img_per_s)
                evaluated_at = self.loop.images_seen
                next_eval += every_img * max(1, math.ceil((self.loop.images_seen - next_eval + 1) / every_img))
                window_start, window_images = time.monotonic(), 0
                self._ask_population(metrics)
            tick = time.monotonic()
        if evaluated_at != self.loop.images_seen:
            if self.loop.step:
                stats = self.loop.read_stats()
            self.train_time_s += time.monotonic() - tick
            self.evaluate(stats, img_per_s)
        return Result(self.loop.step, self.loop.images_seen, self.best_fid, self.history)

    def _ask_population(self, metrics: dict[str, float]) -> None:
        """PBT: tell the population how this round went; continue from another trial's
        state when it says so."""
        round_ = round(metrics["images_seen"] / (self.cfg.eval.every_kimg * 1000))
        taken = self.session.exploit(round_, metrics, self.params())
        if taken:
            self._continue_from(*taken)

    def params(self) -> dict[str, Any]:
        """The settings a population compares and perturbs, as they are now."""
        flat = self.cfg.flat()
        return {key: flat[key] for key in MUTABLE}

    def _progress(self, stats: dict[str, float], img_per_s: float) -> None:
        if self.session.rank != 0 or self.session.quiet:
            return
        done = self._share_done(self.train_time_s)
        # The scheduled settings go to the tracker only: a learning rate at 3 decimals reads 0.
        losses = "  ".join(f"{k} {v:+.3f}" for k, v in stats.items() if not k.startswith("schedule/"))
        fid = f"  fid {self.history[-1]['fid']:.2f} (best {self.best_fid:.2f})" if self.history else ""
        print(
            f"[{min(done, 1):6.1%}] step {self.loop.step:6d}  kimg {self.loop.images_seen / 1000:7.1f}  "
            f"{img_per_s:6.0f} img/s  {losses}{fid}",
            flush=True,
        )
        if warning := self.stall(self.loop.step, stats):
            print(warning, flush=True)


def evaluation_line(metrics: dict[str, float], is_best: bool) -> str:
    """What rank 0 prints after each evaluation, in-process and under Ray alike."""
    classes = "".join(
        f"{label} {metrics[key]:.2f}  "
        for key, label in (("class_accuracy", "class accuracy"), ("class_variety", "variety within classes"))
        if key in metrics
    )
    return (
        f"  eval at kimg {metrics['kimg']:.1f}: fid {metrics['fid']:.2f}  kid {metrics['kid']:.4f}  "
        f"precision {metrics['precision']:.2f}  recall {metrics['recall']:.2f}  {classes}"
        f"(floor {metrics['fid_floor']:.2f})  eval {metrics['time/eval_s']:.1f}s" + ("  * new best" if is_best else "")
    )
