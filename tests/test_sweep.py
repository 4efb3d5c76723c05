"""The sweep's pieces without a cluster: search space, plan, budget, summary, CLI errors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from services import ROOT

from gan import sweep
from gan.config import ConfigError, preset
from gan.distributed import Scaling


def test_space_entries_parse_to_dimensions():
    assert sweep.dimension("model.depth", 1) == sweep.Dimension("model.depth", "constant", (1,))
    assert sweep.dimension("optim.lr_g", {"loguniform": [1e-5, 1e-3]}).kind == "loguniform"
    assert sweep.dimension("model.width", {"choice": [32, 64]}).values == (32, 64)
    assert sweep.parse_override("optim.lr_g=loguniform:1e-5:1e-3") == ("optim.lr_g", {"loguniform": [1e-5, 1e-3]})
    assert sweep.parse_override("model.width=choice:32,64") == ("model.width", {"choice": [32, 64]})
    assert sweep.parse_override("loss.augment=choice:,translation") == ("loss.augment", {"choice": ["", "translation"]})
    assert sweep.parse_override("model.family=resnet") == ("model.family", "resnet")
    assert sweep.parse_override("loss.r1_gamma=grid:0,1e39") == ("loss.r1_gamma", {"grid": [0, 1e39]})
    assert sweep.dimension("loss.kind", {"grid": ["ns", "hinge"]}).describe() == "grid{'ns', 'hinge'}"


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
        sweep.dimension(key, spec)
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
        sweep.build_space(preset("dcgan"), spec)


def test_default_spaces_are_valid_and_cover_what_the_issue_asks():
    for spec in (sweep.CPU_SPACE, sweep.GPU_SPACE):
        sweep.build_space(preset("dcgan"), spec)
    covered = {"optim.lr_g", "optim.lr_d", "optim.beta1", "optim.beta2", "loss.kind", "model.family",
               "model.width", "model.depth", "train.ema_half_life_kimg", "loss.augment"}  # fmt: skip
    assert covered <= set(sweep.GPU_SPACE)
    assert sweep.GPU_SPACE["model.family"] == {"choice": ["dcgan", "resnet"]}


def test_space_files_in_yaml_and_json(tmp_path):
    (tmp_path / "space.yaml").write_text("optim.lr_g: {loguniform: [1.0e-5, 1.0e-3]}\nmodel.width: 32\n")
    (tmp_path / "space.json").write_text('{"optim.lr_d": {"choice": [0.0001, 0.0002]}}')
    assert sweep.load_space_file(str(tmp_path / "space.yaml"))["model.width"] == 32
    assert sweep.load_space_file(str(tmp_path / "space.json")) == {"optim.lr_d": {"choice": [0.0001, 0.0002]}}
    with pytest.raises(ConfigError, match="does not exist"):
        sweep.load_space_file(str(tmp_path / "nope.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must map"):
        sweep.load_space_file(str(tmp_path / "list.yaml"))


def test_trial_config_applies_the_sample_and_the_rounds():
    plan = sweep.Plan(rounds=3, kimg_per_round=2.5)
    cfg = sweep.trial_config(preset("dcgan"), {"optim.lr_g": 3e-4, "loss.augment": "", "model.width": 32}, plan)
    assert (cfg.optim.lr_g, cfg.loss.augment, cfg.model.width) == (3e-4, "", 32)
    assert (cfg.train.total_kimg, cfg.eval.every_kimg) == (7.5, 2.5)


def test_asha_work_estimate():
    assert sweep.expected_rounds(sweep.Plan(trials=8, rounds=4)) == 16  # 8x1 + 4x1 + 2x2
    assert sweep.expected_rounds(sweep.Plan(trials=8, rounds=4, grace_rounds=4)) == 32  # no early stop
    assert sweep.expected_rounds(sweep.Plan(trials=1, rounds=3)) == 3


def test_concurrency_never_oversubscribes():
    cpu = {"CPU": 2.0}
    assert sweep.max_concurrent_trials(sweep.Plan(), cpu) == 2
    assert sweep.max_concurrent_trials(sweep.Plan(scaling=Scaling(workers=2)), cpu) == 1
    assert sweep.max_concurrent_trials(sweep.Plan(scaling=Scaling(workers=3)), cpu) == 0
    gpus = sweep.Plan(scaling=Scaling(workers=2, use_gpu=True, gpus_per_worker=1))
    assert sweep.max_concurrent_trials(gpus, {"CPU": 32, "GPU": 5}) == 2
    half = sweep.Plan(scaling=Scaling(workers=1, use_gpu=True, gpus_per_worker=0.5))
    assert sweep.max_concurrent_trials(half, {"CPU": 32, "GPU": 2}) == 4


def test_sweep_name_is_deterministic_and_tracks_the_space():
    base, plan = preset("dcgan"), sweep.Plan()
    space = sweep.build_space(base, sweep.CPU_SPACE)
    assert sweep.sweep_name(base, space, plan) == sweep.sweep_name(base, space, plan)
    other = sweep.build_space(base, {**sweep.CPU_SPACE, "model.depth": 0})
    assert sweep.sweep_name(base, other, plan) != sweep.sweep_name(base, space, plan)


def _row(trial_id, outcome, history, error=""):
    fids = [f for _, f in history]
    return sweep.TrialSummary(
        trial_id, {"optim.lr_g": 2e-4}, outcome, len(history), history[-1][0] if history else 0,
        fids[-1] if fids else math.inf, min(fids, default=math.inf), 12.0, history, None, error,
    )  # fmt: skip


def test_summary_table_and_plot():
    plan = sweep.Plan(rounds=2)
    rows = [_row("a_1", "completed", [(10, 500.0), (20, 400.0)]), _row("a_2", "stopped", [(10, 900.0)]),
            _row("a_3", "error", [], "DivergenceError: loss is NaN at step 3")]  # fmt: skip
    space = sweep.build_space(preset("dcgan"), {"optim.lr_g": {"loguniform": [1e-4, 1e-3]}, "model.depth": 0})
    text = sweep.table(rows, space, plan)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["trial", "best", "FID"] and "optim.lr_g" in lines[0]
    assert "model.depth" not in lines[0]  # constants are not columns
    assert "completed 2/2 rounds" in lines[2] and "stopped by ASHA at round 1/2" in lines[3]
    assert "error: DivergenceError: loss is NaN at step 3" in lines[4]
    png = sweep.plot_fid(rows, floor=6.5)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def run_tune(*args):
    return subprocess.run([sys.executable, "pipelines/tune.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--space", "model.width=choice:2,64"], "model.width"),
        (["--space", "optim.lr_g"], "SECTION.FIELD=VALUE"),
        (["--trials", "0"], "--trials"),
        (["--grace-rounds", "5", "--rounds", "4"], "--grace-rounds 5"),
        (["--preset", "nope"], "nope"),
        (["--space-file", "/no/such/space.yaml"], "does not exist"),
    ],
)
def test_cli_rejects_bad_input_in_one_line(args, message):
    result = run_tune(*args, "--no-tracking")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_dry_run_shows_config_and_space():
    result = run_tune("--dry-run", "--space", "model.depth=1")
    assert result.returncode == 0, result.stderr
    assert '"family": "dcgan"' in result.stdout and "optim.lr_g" in result.stdout


def test_optuna_search_samples_the_space(tmp_path):
    """The Optuna integration takes the converted space (a tiny Tune run, no training)."""
    import ray
    from ray import tune

    space = sweep.build_space(preset("dcgan"), sweep.CPU_SPACE)
    plan = sweep.Plan(trials=3, search="optuna", seed=1)

    def trainable(params):
        sweep.trial_config(preset("dcgan"), params, plan)  # every sample is a valid config
        tune.report({"fid": params["optim.lr_g"] * 1e6})

    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            trainable,
            param_space={k: d.to_tune() for k, d in space.items()},
            tune_config=tune.TuneConfig(metric="fid", mode="min", num_samples=3, search_alg=sweep.make_search(plan, 1)),
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

    plan = sweep.Plan(rounds=2, grace_rounds=1, reduction_factor=2)
    first, last = decisions(sweep.make_scheduler(plan))
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
            tune_config=tune.TuneConfig(num_samples=3, search_alg=sweep.make_search(sweep.Plan(trials=3), 1)),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "tune")),
        ).fit()
    finally:
        ray.shutdown()
    intervals = sorted(tuple(map(float, p.read_text().split())) for p in spans.iterdir())
    assert len(intervals) == 3
    assert all(later[0] >= earlier[1] for earlier, later in zip(intervals, intervals[1:], strict=False))
