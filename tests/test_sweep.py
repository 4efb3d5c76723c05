"""The sweep's pieces without a cluster: search space, plan, budget, summary, CLI errors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from entry import call
from services import ROOT

from gan.core.config import ConfigError, preset
from gan.sweeps import plan as plans
from gan.sweeps import report as reports
from gan.sweeps import space as spaces
from gan.sweeps.plan import Scaling


def test_space_entries_parse_to_dimensions():
    assert spaces.dimension("model.depth", 1) == spaces.Dimension("model.depth", "constant", (1,))
    assert spaces.dimension("optim.lr_g", {"loguniform": [1e-5, 1e-3]}).kind == "loguniform"
    assert spaces.dimension("model.width", {"choice": [32, 64]}).values == (32, 64)
    assert spaces.parse_override("optim.lr_g=loguniform:1e-5:1e-3") == ("optim.lr_g", {"loguniform": [1e-5, 1e-3]})
    assert spaces.parse_override("model.width=choice:32,64") == ("model.width", {"choice": [32, 64]})
    assert spaces.parse_override("loss.augment=choice:,translation") == (
        "loss.augment",
        {"choice": ["", "translation"]},
    )
    assert spaces.parse_override("model.family=resnet") == ("model.family", "resnet")
    assert spaces.parse_override("loss.r1_gamma=grid:0,1e39") == ("loss.r1_gamma", {"grid": [0, 1e39]})
    assert spaces.dimension("loss.kind", {"grid": ["ns", "hinge"]}).describe() == "grid{'ns', 'hinge'}"


@pytest.mark.parametrize(
    "key, spec, message",
    [
        ("optim.lr_g", {"loguniform": [1e-3, 1e-5]}, "low < high"),
        ("optim.lr_g", {"loguniform": [0, 1e-3]}, "positive low end"),
        ("optim.lr_g", {"normal": [0, 1]}, "write a value or one of"),
        ("optim.lr_g", {"uniform": [1e-4]}, "takes 2 values"),
    ],
)
def test_bad_space_entries_name_the_field(key, spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        spaces.dimension(key, spec)
    assert key in str(err.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"optim.lr_g": {"loguniform": [1e-4, 2.0]}}, "optim.lr_g"),  # upper end outside (0, 1]
        ({"model.width": {"choice": [2, 64]}}, "model.width"),
        ({"model.family": {"choice": ["dcgan", "vit"]}}, "model.family"),
        ({"optim.learning_rate": 1e-3}, "optim.learning_rate"),
    ],
)
def test_space_is_checked_against_the_config_before_any_trial(spec, message):
    with pytest.raises(ConfigError, match=message):
        spaces.build_space(preset("dcgan"), spec)


def test_default_spaces_are_valid_and_cover_what_the_issue_asks():
    for spec in (spaces.CPU_SPACE, spaces.GPU_SPACE):
        spaces.build_space(preset("dcgan"), spec)
    covered = {"optim.lr_g", "optim.lr_d", "optim.beta1", "optim.beta2", "loss.kind", "model.family",
               "model.width", "model.depth", "train.ema_half_life_kimg", "loss.augment"}  # fmt: skip
    assert covered <= set(spaces.GPU_SPACE)
    assert spaces.GPU_SPACE["model.family"] == {"choice": ["dcgan", "resnet"]}


def test_space_files_in_yaml_and_json(tmp_path):
    (tmp_path / "space.yaml").write_text("optim.lr_g: {loguniform: [1.0e-5, 1.0e-3]}\nmodel.width: 32\n")
    (tmp_path / "space.json").write_text('{"optim.lr_d": {"choice": [0.0001, 0.0002]}}')
    assert spaces.load_space_file(str(tmp_path / "space.yaml"))["model.width"] == 32
    assert spaces.load_space_file(str(tmp_path / "space.json")) == {"optim.lr_d": {"choice": [0.0001, 0.0002]}}
    with pytest.raises(ConfigError, match="does not exist"):
        spaces.load_space_file(str(tmp_path / "nope.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must map"):
        spaces.load_space_file(str(tmp_path / "list.yaml"))


def test_trial_config_applies_the_sample_and_the_rounds():
    plan = plans.Plan(rounds=3, kimg_per_round=2.5)
    cfg = plans.trial_config(preset("dcgan"), {"optim.lr_g": 3e-4, "loss.augment": "", "model.width": 32}, plan)
    assert (cfg.optim.lr_g, cfg.loss.augment, cfg.model.width) == (3e-4, "", 32)
    assert (cfg.train.total_kimg, cfg.eval.every_kimg) == (7.5, 2.5)


def test_asha_work_estimate():
    assert plans.expected_rounds(plans.Plan(trials=8, rounds=4)) == 16  # 8x1 + 4x1 + 2x2
    assert plans.expected_rounds(plans.Plan(trials=8, rounds=4, grace_rounds=4)) == 32  # no early stop
    assert plans.expected_rounds(plans.Plan(trials=1, rounds=3)) == 3


def test_concurrency_never_oversubscribes():
    cpu = {"CPU": 2.0}
    assert plans.max_concurrent_trials(plans.Plan(), cpu) == 2
    assert plans.max_concurrent_trials(plans.Plan(scaling=Scaling(workers=2)), cpu) == 1
    assert plans.max_concurrent_trials(plans.Plan(scaling=Scaling(workers=3)), cpu) == 0
    gpus = plans.Plan(scaling=Scaling(workers=2, use_gpu=True, gpus_per_worker=1))
    assert plans.max_concurrent_trials(gpus, {"CPU": 32, "GPU": 5}) == 2
    half = plans.Plan(scaling=Scaling(workers=1, use_gpu=True, gpus_per_worker=0.5))
    assert plans.max_concurrent_trials(half, {"CPU": 32, "GPU": 2}) == 4


def test_sweep_name_is_deterministic_and_tracks_the_space():
    base, plan = preset("dcgan"), plans.Plan()
    space = spaces.build_space(base, spaces.CPU_SPACE)
    assert plans.sweep_name(base, space, plan) == plans.sweep_name(base, space, plan)
    other = spaces.build_space(base, {**spaces.CPU_SPACE, "model.depth": 0})
    assert plans.sweep_name(base, other, plan) != plans.sweep_name(base, space, plan)


def _row(trial_id, outcome, history, error=""):
    fids = [f for _, f in history]
    return reports.TrialSummary(
        trial_id, {"optim.lr_g": 2e-4}, outcome, len(history), history[-1][0] if history else 0,
        fids[-1] if fids else math.inf, min(fids, default=math.inf), 12.0, history, None, error,
    )  # fmt: skip


def test_summary_table_and_plot():
    plan = plans.Plan(rounds=2)
    rows = [_row("a_1", "completed", [(10, 500.0), (20, 400.0)]), _row("a_2", "stopped", [(10, 900.0)]),
            _row("a_3", "error", [], "DivergenceError: loss is NaN at step 3")]  # fmt: skip
    space = spaces.build_space(preset("dcgan"), {"optim.lr_g": {"loguniform": [1e-4, 1e-3]}, "model.depth": 0})
    text = reports.table(rows, space, plan)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["trial", "best", "FID"] and "optim.lr_g" in lines[0]
    assert "model.depth" not in lines[0]  # constants are not columns
    assert "completed 2/2 rounds" in lines[2] and "stopped by ASHA at round 1/2" in lines[3]
    assert "error: DivergenceError: loss is NaN at step 3" in lines[4]
    png = reports.plot_fid(rows, floor=6.5)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--space", "model.width=choice:2,64"], "model.width"),
        (["--space", "optim.lr_g"], "SECTION.FIELD=VALUE"),
        (["--trials", "0"], "--trials 0: must be positive"),
        (["--budget-minutes", "-3"], "--budget-minutes -3: must be positive"),
        (["--kimg-per-round", "0"], "--kimg-per-round 0: must be positive"),
        (["--grace-rounds", "5", "--rounds", "4"], "--grace-rounds 5"),
        (["--preset", "nope"], "nope"),
        (["--space-file", "/no/such/space.yaml"], "does not exist"),
    ],
)
def test_cli_rejects_bad_input_in_one_line(args, message, capfd):
    call(capfd, "tune.py", *args, "--no-tracking").one_line(message)


def test_cli_dry_run_shows_config_and_space(capfd):
    shown = call(capfd, "tune.py", "--dry-run", "--space", "model.depth=1")
    assert shown.code == 0, shown.err
    assert '"family": "dcgan"' in shown.out and "optim.lr_g" in shown.out


def test_optuna_search_samples_the_space(tmp_path):
    """The Optuna integration takes the converted space (a tiny Tune run, no training)."""
    import ray
    from ray import tune

    from gan.sweeps.ray_tune import make_search, tune_domain

    space = spaces.build_space(preset("dcgan"), spaces.CPU_SPACE)
    plan = plans.Plan(trials=3, search="optuna", seed=1)

    def trainable(params):
        plans.trial_config(preset("dcgan"), params, plan)  # every sample is a valid config
        tune.report({"fid": params["optim.lr_g"] * 1e6})

    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            trainable,
            param_space={k: tune_domain(d) for k, d in space.items()},
            tune_config=tune.TuneConfig(metric="fid", mode="min", num_samples=3, search_alg=make_search(plan, 1)),
            run_config=tune.RunConfig(storage_path=str(tmp_path)),
        )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    assert len(grid) == 3 and not grid.errors
    for result in grid:
        assert 1e-4 <= result.config["optim.lr_g"] <= 2e-3 and result.config["model.width"] in (32, 64)


class _Trial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def test_asha_cuts_weak_trials_but_never_at_the_last_round():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from gan.sweeps.ray_tune import make_scheduler

    def decisions(scheduler):
        scheduler.set_search_properties("fid", "min", config={})
        trials = [_Trial(f"t{i}") for i in range(4)]
        for trial in trials:
            scheduler.on_trial_add(None, trial)
        first = [scheduler.on_trial_result(None, t, {"training_iteration": 1, "fid": f})
                 for t, f in zip(trials, (100.0, 90.0, 300.0, 80.0), strict=True)]  # fmt: skip
        # t1 goes on; at round 2 (the last) it is worse than t0 was there.
        scheduler.on_trial_result(None, trials[0], {"training_iteration": 2, "fid": 50.0})
        scheduler.on_trial_result(None, trials[3], {"training_iteration": 2, "fid": 40.0})
        last = scheduler.on_trial_result(None, trials[1], {"training_iteration": 2, "fid": 500.0})
        return first, last

    plan = plans.Plan(rounds=2, grace_rounds=1, reduction_factor=2)
    first, last = decisions(make_scheduler(plan))
    assert first[2] == TrialScheduler.STOP  # the weak trial is cut at the first rung
    assert last == TrialScheduler.CONTINUE  # and the last round is never cut
    plain = ASHAScheduler(time_attr="training_iteration", max_t=2, grace_period=1, reduction_factor=2)
    assert decisions(plain)[1] == TrialScheduler.STOP  # what plain ASHA would do there


def test_search_holds_trials_to_the_concurrency(tmp_path):
    """Tune ignores TuneConfig.max_concurrent_trials for a search algorithm passed in, so
    make_search must limit it: with room for 2 trials and a limit of 1, none overlap."""
    import time

    import ray
    from ray import tune

    from gan.sweeps.ray_tune import make_search

    spans = tmp_path / "spans"
    spans.mkdir()

    def trainable(params):
        start = time.time()
        time.sleep(1.5)
        (spans / f"{start}").write_text(f"{start} {time.time()}")
        tune.report({"fid": 1.0})

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        tune.Tuner(
            trainable,
            param_space={"x": tune.uniform(0, 1)},
            tune_config=tune.TuneConfig(num_samples=3, search_alg=make_search(plans.Plan(trials=3), 1)),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "tune")),
        ).fit()
    finally:
        ray.shutdown()
    intervals = sorted(tuple(map(float, p.read_text().split())) for p in spans.iterdir())
    assert len(intervals) == 3
    assert all(later[0] >= earlier[1] for earlier, later in zip(intervals, intervals[1:], strict=False))


def test_space_language_needs_neither_ray_nor_torch(tmp_path):
    """A space file is parsed and checked against the config with Ray and torch blocked
    from import, as on a machine that has neither."""
    (tmp_path / "space.yaml").write_text(
        "optim.lr_g: {loguniform: [1.0e-4, 1.0e-3]}\nmodel.width: {choice: [32, 64]}\n"
    )
    script = f"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "torch"):
            raise ImportError(f"{{name}} is blocked in this test")

sys.meta_path.insert(0, Block())
from gan.sweeps import plan
from gan.sweeps import space
from gan.core.config import preset
spec = space.load_space_file({str(tmp_path / "space.yaml")!r})
spec.update([space.parse_override("model.depth=choice:0,1")])
dims = space.build_space(preset("dcgan"), spec)
p = plan.Plan(trials=4, rounds=2)
print(len(dims), plan.sweep_name(preset("dcgan"), dims, p), plan.expected_rounds(p))
assert not any(m.split(".")[0] in ("ray", "torch") for m in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    count, name, rounds = result.stdout.split()
    assert count == "3" and name.startswith("sweep-dcgan-") and float(rounds) == 6.0


def test_a_resumed_sweep_killed_before_tune_wrote_its_state_starts_afresh(tmp_path, capsys):
    """A start killed between its claim and Tune's first state file leaves only `.claim`:
    `--resume` begins the sweep instead of failing inside Tuner.restore."""
    import ray

    from gan.data.storage import CLAIM_FILE, Storage
    from gan.sweeps import ray_tune

    storage = Storage.parse(str(tmp_path))
    (tmp_path / "sweep-x").mkdir()
    (tmp_path / "sweep-x" / CLAIM_FILE).write_text("{}")
    plan = plans.Plan(trials=1, rounds=1)
    setup = ray_tune.TrialSetup(preset("debug").to_json(), plan, "sweep-x", storage, None)
    space = spaces.build_space(preset("debug"), {"optim.lr_g": {"choice": [1e-4, 2e-4]}})
    ray_tune.make_tuner(lambda config: None, setup, space, 1, resume=True)  # Tuner.restore would raise
    assert "holds no sweep state yet: starting the sweep" in capsys.readouterr().out
    assert not ray.is_initialized()
