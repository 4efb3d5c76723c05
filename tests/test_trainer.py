"""The Trainer end to end in-process: resume through a checkpoint on disk is bit-for-bit,
with and without every speed option; compiling changes images only by float noise."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gan.core.config import override
from gan.core.loop import ema_beta, lr_scale
from gan.runs import checkpoint
from gan.runs.session import LocalSession
from gan.runs.trainer import StallWatch, Trainer
from gan.sweeps.population import Exploit

# The speed options that run on a CPU (tf32 and cudnn_benchmark act on CUDA only), and all
# of them: compiling alone takes half a minute.
EAGER_SPEED = ["train.channels_last=true", "optim.adam_impl=fused", "train.foreach_ema=true"]
SPEED = ["train.compile=true", *EAGER_SPEED]


@pytest.mark.parametrize(
    ("options", "half_kimg"),
    [
        pytest.param([], 0.08, id="defaults-10-steps"),
        pytest.param(EAGER_SPEED, 0.08, id="eager-speed-options-10-steps"),
        pytest.param([], 0.32, id="defaults", marks=pytest.mark.slow),
        pytest.param(SPEED, 0.32, id="every-speed-option", marks=pytest.mark.slow),
    ],
)
def test_resume_from_disk_is_bit_for_bit(tiny_cfg, digits, tmp_path, options, half_kimg):
    evals = f"eval.every_kimg={half_kimg}"
    full_cfg = override(tiny_cfg, [f"train.total_kimg={2 * half_kimg}", evals, *options])
    half_cfg = override(tiny_cfg, [f"train.total_kimg={half_kimg}", evals, *options])
    half_steps = round(half_kimg * 1000 / tiny_cfg.train.batch_size)
    straight = Trainer(full_cfg, LocalSession(str(tmp_path / "a"), quiet=True), data=digits)
    straight.train()

    Trainer(half_cfg, LocalSession(str(tmp_path / "b"), quiet=True), data=digits).train()
    resumed = Trainer(full_cfg, LocalSession(str(tmp_path / "b"), resume=True, quiet=True), data=digits)
    assert resumed.loop.step == half_steps
    resumed.train()

    a, _ = checkpoint.load(checkpoint.find(str(tmp_path / "a")).latest)
    b, _ = checkpoint.load(checkpoint.find(str(tmp_path / "b")).latest)
    assert a["loop"]["step"] == b["loop"]["step"] == 2 * half_steps
    for net in ("G", "D", "G_ema"):
        for key, value in a["loop"][net].items():
            assert torch.equal(b["loop"][net][key], value), f"{net}.{key}"
    for opt in ("opt_g", "opt_d"):
        for idx, state in a["loop"][opt]["state"].items():
            assert torch.equal(b["loop"][opt]["state"][idx]["exp_avg_sq"], state["exp_avg_sq"])
    assert [h["fid"] for h in a["history"]] == [h["fid"] for h in b["history"]]


def test_a_resumed_run_keeps_its_best_weights_and_takes_new_learning_rates(tiny_cfg, digits, tmp_path):
    cfg = override(tiny_cfg, ["train.total_kimg=0.32", "eval.every_kimg=0.32"])
    first = Trainer(cfg, LocalSession(str(tmp_path), quiet=True), data=digits)
    first.train()
    changed = ["train.total_kimg=0.48", "optim.lr_g=1e-5", "optim.lr_d=3e-5", "optim.beta2=0.9"]
    resumed = Trainer(override(cfg, changed), LocalSession(str(tmp_path), resume=True, quiet=True), data=digits)
    assert resumed.best_G_ema is not None  # what generator_best is logged from, after any restart
    for key, value in first.best_G_ema.items():
        assert torch.equal(resumed.best_G_ema[key], value), key
    opt_g, opt_d = resumed.loop.opt_g, resumed.loop.opt_d
    assert opt_g.state and opt_d.state  # Adam's moments came with the checkpoint
    assert [g["lr"] for g in opt_g.param_groups] == [1e-5] and [g["lr"] for g in opt_d.param_groups] == [3e-5]
    assert all(g["betas"] == (cfg.optim.beta1, 0.9) for g in opt_g.param_groups + opt_d.param_groups)


def test_learning_rates_decay_to_zero_over_the_budgets_end_and_a_resumed_run_continues_the_decay(
    tiny_cfg, digits, tmp_path
):
    assert [lr_scale(p, 0.5) for p in (0.0, 0.5, 0.75, 1.0, 1.2)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    decay = ["optim.lr_decay_start=0.5", "eval.every_kimg=0.08", "train.log_every_steps=1"]
    full_cfg = override(tiny_cfg, ["train.total_kimg=0.32", *decay])
    straight = Trainer(full_cfg, LocalSession(str(tmp_path / "a"), quiet=True), data=digits)
    straight.train()
    # Evaluated at steps 5, 10, 15 and 20 of 20: full rates for the first half, then falling.
    assert [h["optim/lr_scale"] for h in straight.history] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert [g["lr"] for g in straight.loop.opt_g.param_groups + straight.loop.opt_d.param_groups] == [0.0, 0.0]

    # Killed after its checkpoint at step 15 and resumed: the decay goes on from 0.5, bit for bit.
    class KilledAfterStep15(LocalSession):
        def report(self, metrics, snapshot):
            super().report(metrics, snapshot)
            if metrics["step"] == 15:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(full_cfg, KilledAfterStep15(str(tmp_path / "b"), quiet=True), data=digits).train()
    resumed = Trainer(full_cfg, LocalSession(str(tmp_path / "b"), resume=True, quiet=True), data=digits)
    resumed.train()
    for key, value in straight.nets.G_ema.state_dict().items():
        assert torch.equal(resumed.nets.G_ema.state_dict()[key], value), key


def _images(trainer: Trainer) -> torch.Tensor:
    z = torch.randn(100, trainer.cfg.model.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return trainer.nets.G_ema(z, torch.arange(100) % trainer.cfg.model.num_classes)


@pytest.mark.slow  # compiling takes half a minute
def test_compile_gives_the_same_images_up_to_float_noise(tiny_cfg, digits, tmp_path):
    """Tolerance: after 10 steps the EMA generator's images from a compiled and an eager
    run differ by at most 5e-3 on the [-1, 1] scale, under one uint8 level (2/255); measured
    4.5e-4 with the class loss on (its class scores pass through the compiled D). Compiled
    kernels sum in another order, so bit equality is not expected."""
    images = {}
    for compiled in (False, True):
        cfg = override(tiny_cfg, ["train.total_kimg=0.16", "loss.class_weight=1", f"train.compile={compiled}"])
        trainer = Trainer(cfg, LocalSession(str(tmp_path / str(compiled)), quiet=True), data=digits)
        assert hasattr(trainer.nets.G_train, "_orig_mod") == compiled  # really compiled
        trainer.train()
        images[compiled] = _images(trainer)
    torch.testing.assert_close(images[True], images[False], rtol=0, atol=5e-3)


class _Stop(Exception):
    pass


def _tracked_status(tmp_path, tiny_cfg, digits, error):
    from mlflow.tracking import MlflowClient

    from gan.registry.tracking import MLflowTracker, TrackingTarget

    target = TrackingTarget(f"sqlite:///{tmp_path}/mlflow.db", "gan", "run")
    trainer = Trainer(
        tiny_cfg, LocalSession(str(tmp_path / "out"), quiet=True), data=digits, tracker=MLflowTracker(target)
    )

    def boom():
        raise error

    trainer.loop.train_step = boom
    with pytest.raises(type(error)):
        trainer.train()
    client = MlflowClient(target.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gan").experiment_id])
    return run.info.status


@pytest.mark.parametrize(("error", "status"), [(_Stop("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_failed_and_stopped_runs_end_with_the_right_status(tmp_path, tiny_cfg, digits, error, status):
    assert _tracked_status(tmp_path, tiny_cfg, digits, error) == status


def test_time_budget_stops_at_the_step_where_it_runs_out(tiny_cfg, digits, tmp_path):
    """Without a check (or an all-reduce) every step: at a logging step the ranks agree on
    how many steps the budget still holds at the current pace, and stop there."""
    cfg = override(tiny_cfg, ["train.time_budget_s=10"])
    trainer = Trainer(cfg, LocalSession(str(tmp_path), quiet=True), data=digits)
    trainer.train_time_s = 9.0
    assert trainer._steps_left(seconds_per_step=0.1) == 10
    assert trainer._steps_left(seconds_per_step=2.0) == 0
    trainer.train_time_s = 12.0  # already over: no step left, never negative
    assert trainer._steps_left(seconds_per_step=0.1) == 0
    result = trainer.train()
    assert result.step == 0 and len(result.history) == 1  # over budget at the start: evaluate only


def test_resume_falls_back_past_a_corrupt_latest_checkpoint(tiny_cfg, digits, tmp_path, capsys):
    """A newest checkpoint whose state.pt is torn is skipped, with a line saying so; the run
    resumes from the one before and writes that step again, whole."""
    import json
    import shutil

    run = tmp_path / "run"
    cfg = override(tiny_cfg, ["train.total_kimg=0.32", "eval.every_kimg=0.32"])
    Trainer(cfg, LocalSession(str(run), quiet=True), data=digits).train()
    good = run / checkpoint.dir_name(20)
    torn = run / checkpoint.dir_name(30)
    shutil.copytree(good, torn)
    meta = json.loads((good / "meta.json").read_text())
    (torn / "meta.json").write_text(json.dumps({**meta, "step": 30, "images_seen": 480}))
    (torn / "state.pt").write_bytes((good / "state.pt").read_bytes()[:1000])

    longer = override(tiny_cfg, ["train.total_kimg=0.48", "eval.every_kimg=0.16"])
    resumed = Trainer(longer, LocalSession(str(run), resume=True, quiet=True), data=digits)
    said = capsys.readouterr().out
    assert f"skipping a checkpoint that does not load: {torn}" in said
    assert f"falling back to {good}" in said and resumed.loop.step == 20
    resumed.train()
    state, meta = checkpoint.load(str(torn))  # written again, whole
    assert state["loop"]["step"] == meta["step"] == 30
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_checkpoint_written_whole_or_not_at_all(tiny_cfg, digits, tmp_path):
    """A write that fails leaves no folder and no temporary file; state.pt and meta.json that
    disagree are refused, naming the file."""
    run = tmp_path / "run"
    trainer = Trainer(tiny_cfg, LocalSession(str(run), quiet=True), data=digits)
    state = trainer.state_dict()
    with pytest.raises(TypeError):
        checkpoint.save(str(run / checkpoint.dir_name(1)), state, {"step": 0}, grid_png="not bytes")
    assert not run.exists() or not list(run.iterdir())
    checkpoint.save(str(run / checkpoint.dir_name(1)), state, {"step": 5})
    with pytest.raises(checkpoint.CheckpointError, match="meta.json says step 5 but state.pt holds step 0"):
        checkpoint.load(str(run / checkpoint.dir_name(1)))


class OnePopulation(LocalSession):
    """A PBT population of one donor: after round 1 this run continues from the donor's
    round-1 checkpoint with ``params``."""

    in_population = True

    def __init__(self, run_uri: str, donor: str, params: dict) -> None:
        super().__init__(run_uri, quiet=True)
        self.donor, self.params = donor, params

    def exploit(self, round_, metrics, params):
        if round_ != 1:
            return None
        state, _ = checkpoint.load(self.donor)
        return Exploit("donor", self.donor, 1, state["loop"]["images_seen"], self.params, {}), state


def test_an_exploit_continues_from_the_donors_state_with_new_settings_and_keeps_them_on_resume(
    tiny_cfg, digits, tmp_path
):
    cfg = override(tiny_cfg, ["train.total_kimg=0.64", "eval.every_kimg=0.32"])
    donor = Trainer(cfg, LocalSession(str(tmp_path / "donor"), quiet=True), data=digits)
    donor.train()
    half = override(cfg, ["train.total_kimg=0.32"])
    Trainer(half, LocalSession(str(tmp_path / "round1"), quiet=True), data=digits).train()
    round1 = checkpoint.find(str(tmp_path / "round1")).latest

    # With the donor's own settings the exploiting run trains on exactly as the donor did.
    weak = override(cfg, ["optim.lr_g=1e-6", "optim.lr_d=1e-6"])
    same = donor.params()
    copy = Trainer(weak, OnePopulation(str(tmp_path / "copy"), round1, same), data=digits)
    copy.train()
    assert copy.loop.step == donor.loop.step and len(copy.lineage) == 1
    for key, value in donor.nets.G_ema.state_dict().items():
        assert torch.equal(copy.nets.G_ema.state_dict()[key], value), key
    assert copy.history[0]["fid"] != donor.history[0]["fid"]  # round 1 was its own
    assert copy.history[1]["fid"] == donor.history[1]["fid"]

    # Explored settings reach the restored optimizers and survive a restart.
    explored = same | {"optim.lr_g": 5e-4, "optim.beta2": 0.95, "train.ema_half_life_kimg": 0.5}
    run = Trainer(weak, OnePopulation(str(tmp_path / "explored"), round1, explored), data=digits)
    run.train()
    resumed = Trainer(override(weak, ["train.total_kimg=0.96"]), LocalSession(str(tmp_path / "explored"), resume=True,
                      quiet=True), data=digits)  # fmt: skip
    for trainer in (run, resumed):
        groups = trainer.loop.opt_g.param_groups + trainer.loop.opt_d.param_groups
        assert [g["lr"] for g in trainer.loop.opt_g.param_groups] == [5e-4]
        assert [g["lr"] for g in trainer.loop.opt_d.param_groups] == [cfg.optim.lr_d]
        assert all(g["betas"] == (cfg.optim.beta1, 0.95) for g in groups)
        assert trainer.loop.beta == ema_beta(cfg.train.batch_size, 0.5)
        assert trainer.cfg.optim.lr_g == 5e-4 and len(trainer.lineage) == 1


def _logs(rows):
    return [{"d/real": real, "d/fake": fake, "grad_norm/g": grad} for real, fake, grad in rows]


def test_a_stalled_discriminator_is_reported_once_and_a_learning_one_never():
    # Logged every 50 steps by dcgan-64 on emoji: with depth 1 D's signal died by step 400;
    # with depth 0 it kept learning, though at times its scores of real and fake came close.
    dead = _logs([(0.029, 0.009, 0.325), (0.006, 0.004, 0.014), (-0.007, -0.007, 0.013), (0.011, 0.012, 0.005),
                  (0.000, 0.000, 0.002), (-0.000, -0.000, 0.000), (-0.002, -0.002, 0.001), (0.000, 0.000, 0.001)])  # fmt: skip
    alive = _logs([(3.421, -0.760, 1.302), (1.712, -1.782, 2.740), (0.025, -0.042, 0.572), (0.252, 0.276, 0.771),
                   (0.079, -0.060, 0.549), (-0.003, -0.114, 0.889), (0.261, 0.239, 0.604), (-0.416, -0.440, 0.669)])  # fmt: skip
    watch = StallWatch()
    assert [watch(step, stats) for step, stats in enumerate(alive * 3)] == [None] * 24

    watch = StallWatch()
    said = [(step, watch(step, stats)) for step, stats in enumerate(dead)]
    assert [step for step, warning in said if warning] == [5]  # the third stalled log in a row, and only it
    assert "D has stopped learning" in said[5][1] and "model.depth" in said[5][1]
    # Stats without G's gradient (not read at a logging step) neither count nor break the streak.
    watch, no_grad = StallWatch(), {"d/real": 0.0, "d/fake": 0.0}
    said = [watch(step, stats) for step, stats in enumerate([dead[5], no_grad, dead[6], no_grad, no_grad, dead[7]])]
    assert [step for step, warning in enumerate(said) if warning] == [5]


def test_a_stall_broken_by_a_learning_log_starts_counting_again():
    stalled, learning = _logs([(0.0, 0.0, 0.001)])[0], _logs([(0.5, -0.5, 0.8)])[0]
    watch = StallWatch()
    said = [watch(step, stats) for step, stats in enumerate([stalled, stalled, learning, stalled, stalled, stalled])]
    assert [step for step, warning in enumerate(said) if warning] == [5]


@pytest.mark.parametrize("labels_mod, num_classes", [(3, 10), (10, 3)], ids=["fewer-in-data", "more-in-data"])
def test_a_class_count_that_differs_from_the_data_is_refused(tiny_cfg, digits, tmp_path, labels_mod, num_classes):
    data = replace(digits, labels=digits.labels % labels_mod)
    cfg = override(tiny_cfg, [f"model.num_classes={num_classes}"])
    message = (
        rf"model\.num_classes={num_classes} but .* has {labels_mod} classes .*set model\.num_classes={labels_mod}$"
    )
    with pytest.raises(ValueError, match=message):
        Trainer(cfg, LocalSession(str(tmp_path), quiet=True), data=data)
    assert not any(tmp_path.iterdir())  # refused before anything was written
