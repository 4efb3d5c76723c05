"""R3GAN's schedules (cfg.schedule): learning rates, Adam's beta2, the R1/R2 gamma and the EMA
half-life along a half cosine over a number of images, in the eager and the captured step,
through a resume, in the logged statistics, in a sweep space and under PBT."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gan.core.config import MUTABLE, Config, ConfigError, override, preset
from gan.core.loop import GANLoop, Nets, ema_beta, make_ema
from gan.core.losses import GANLoss
from gan.core.models import build_models
from gan.core.schedule import cosine, settings_at
from gan.registry.tracking import Tracker
from gan.runs import checkpoint
from gan.runs.session import LocalSession
from gan.runs.trainer import Trainer
from gan.sweeps import space as spaces
from tests.test_capture import SETS, assert_trains_alike, build

# 16 images a step: the schedule runs its whole course over 8 steps and stays at its end after.
SCHEDULE = [
    "schedule.kimg=0.128",
    "schedule.lr_final=0.25",
    "schedule.gamma_final=0.1",
    "schedule.beta2_final=0.99",
    "schedule.ema_half_life_final_kimg=0.5",
]
BASE = ["train.batch_size=16", "loss.r1_gamma=1", "loss.r1_every=2", "optim.beta2=0.9"]


def make_loop(cfg: Config, digits, seed: int = 0) -> GANLoop:
    torch.manual_seed(seed)
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)
    return GANLoop(cfg, Nets(G, D, make_ema(G), G, D), digits)


def weights(loop: GANLoop) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": v.clone() for k in ("G", "D", "G_ema") for n, v in getattr(loop.nets, k).state_dict().items()}


def test_the_cosine_runs_from_start_to_end_then_stays():
    assert cosine(2e-4, 5e-5, 0, 100) == 2e-4
    assert cosine(2e-4, 5e-5, 50_000, 100) == pytest.approx(1.25e-4)  # halfway: the mean
    assert cosine(2e-4, 5e-5, 25_000, 100) == pytest.approx(5e-5 + 1.5e-4 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine(2e-4, 5e-5, 100_000, 100) == 5e-5
    assert cosine(2e-4, 5e-5, 10**9, 100) == 5e-5
    assert cosine(0.9, 0.99, 10**9, 0) == 0.9  # kimg 0: off


def test_settings_follow_the_schedule_and_the_ends_default_to_the_config():
    cfg = override(preset("modern-32-gpu"), ["train.ema_half_life_kimg=2"])
    start, end = settings_at(cfg, 0), settings_at(cfg, cfg.schedule.kimg * 1000)
    assert (start.lr_g, start.beta2, start.gamma_scale, start.ema_half_life_kimg) == (2e-4, 0.9, 1.0, 2.0)
    assert end.lr_g == pytest.approx(5e-5) and end.lr_d == pytest.approx(5e-5)  # R3GAN's 2e-4 -> 5e-5
    assert (end.beta2, end.gamma_scale, end.ema_half_life_kimg) == pytest.approx((0.99, 0.1, 625.0))
    middle = settings_at(cfg, cfg.schedule.kimg * 500)
    assert middle.beta2 == pytest.approx(0.945) and middle.ema_half_life_kimg == pytest.approx(313.5)
    # Ends left at their defaults keep the configured values all along.
    kept = settings_at(override(preset("debug"), ["schedule.kimg=1"]), 10_000)
    assert (kept.lr_g, kept.beta2, kept.gamma_scale, kept.ema_half_life_kimg) == (2e-4, 0.999, 1.0, 0.1)


def test_the_gpu_presets_take_r3gans_schedule_and_the_cpu_presets_none():
    for name in ("modern-32-gpu", "modern-64-cond-gpu", "modern-128-gpu"):
        s = preset(name).schedule
        assert (
            s.kimg > 0
            and (s.lr_final, s.gamma_final, s.beta2_final) == (0.25, 0.1, 0.99)
            and s.ema_half_life_final_kimg > 0
        )
    for name in ("dcgan", "dcgan-64", "modern-32", "modern-64-cond", "modern-128", "debug"):
        assert preset(name).schedule.kimg == 0, name


@pytest.mark.parametrize(
    ("assignment", "fragment"),
    [
        ("schedule.kimg=-1", "schedule.kimg=-1.0 is not allowed: must be >= 0"),
        ("schedule.lr_final=0", "schedule.lr_final=0.0 is not allowed: must be in (0, 1]"),
        ("schedule.lr_final=1.5", "schedule.lr_final=1.5 is not allowed: must be in (0, 1]"),
        ("schedule.gamma_final=0", "schedule.gamma_final=0.0 is not allowed: must be > 0"),
        ("schedule.beta2_final=1", "schedule.beta2_final=1.0 is not allowed: must be in [0, 1) (0 = off)"),
        ("schedule.ema_half_life_final_kimg=-2", "schedule.ema_half_life_final_kimg=-2.0 is not allowed: must be >= 0"),
        ("schedule.kimg=nan", "schedule.kimg=nan is not allowed"),
    ],
)
def test_bad_schedule_values_name_the_field_in_one_line(assignment, fragment):
    with pytest.raises(ConfigError) as err:
        override(preset("debug"), [assignment])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_the_schedule_is_in_every_form_of_the_config_and_old_configs_load_without_it():
    cfg = override(preset("debug"), SCHEDULE)
    assert Config.from_json(cfg.to_json()) == cfg
    assert cfg.to_dict()["schedule"]["lr_final"] == 0.25
    assert cfg.flat()["schedule.kimg"] == 0.128 and cfg.flat()["schedule.ema_half_life_final_kimg"] == 0.5
    old = cfg.to_dict()
    del old["schedule"]  # a checkpoint written before the section existed
    assert Config.from_dict(old).schedule.kimg == 0


def test_penalties_take_the_current_gamma():
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 1)
    D = lambda images, labels: linear(images.flatten(1))  # noqa: E731
    real, fake = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    loss = GANLoss(override(preset("modern-32"), ["loss.r1_gamma=2", "loss.r2_gamma=2"]).loss)
    full = loss.d_reg(D, real, None, fake=fake)
    loss.gamma_scale = 0.1
    scaled = loss.d_reg(D, real, None, fake=fake)
    for key in ("loss/d/r1", "loss/d/r2"):
        assert scaled[key].item() == pytest.approx(0.1 * full[key].item(), rel=1e-5), key


def test_a_loop_trains_with_the_scheduled_settings(digits):
    cfg = override(preset("debug"), [*BASE, *SCHEDULE])
    loop = make_loop(cfg, digits)
    for _ in range(4):
        loop.train_step()
    # The settings of the last step are those at its start: 3 steps of 16 images into 128.
    now = 0.5 * (1 + math.cos(math.pi * 48 / 128))
    at = lambda start, end: end + (start - end) * now  # noqa: E731
    for opt in (loop.opt_g, loop.opt_d):
        (group,) = opt.param_groups
        assert group["lr"] == pytest.approx(at(2e-4, 5e-5)) and group["betas"] == (0.5, pytest.approx(at(0.9, 0.99)))
    assert loop.beta == pytest.approx(ema_beta(16, at(0.1, 0.5)))
    assert loop.loss.gamma_scale == pytest.approx(at(1.0, 0.1))
    for _ in range(6):  # past the schedule's end: its end values
        loop.train_step()
    assert loop.opt_g.param_groups[0]["lr"] == pytest.approx(5e-5) and loop.opt_d.param_groups[0]["betas"][1] == 0.99
    assert loop.loss.gamma_scale == pytest.approx(0.1) and loop.beta == pytest.approx(ema_beta(16, 0.5))
    # And it trains otherwise than the same run without the schedule.
    plain = make_loop(override(preset("debug"), BASE), digits)
    for _ in range(10):
        plain.train_step()
    assert any(not torch.equal(value, weights(loop)[key]) for key, value in weights(plain).items())


def test_the_learning_rate_decay_multiplies_the_schedule(digits):
    loop = make_loop(override(preset("debug"), [*BASE, *SCHEDULE]), digits)
    for _ in range(9):
        loop.train_step()
    loop.scale_learning_rates(0.5)
    assert loop.opt_g.param_groups[0]["lr"] == pytest.approx(0.5 * 5e-5)
    loop.train_step()  # a step keeps the decay's share
    assert loop.opt_d.param_groups[0]["lr"] == pytest.approx(0.5 * 5e-5)
    assert loop.read_stats()["schedule/lr_d"] == pytest.approx(0.5 * 5e-5)


def test_a_scheduled_run_resumes_bit_for_bit(digits):
    cfg = override(preset("debug"), [*BASE, *SCHEDULE])
    reference = make_loop(cfg, digits)
    for _ in range(3):
        reference.train_step()
    state = copy.deepcopy(reference.state_dict())
    for _ in range(4):  # across the schedule's middle
        reference.train_step()
    resumed = make_loop(cfg, digits, seed=99)  # another init: the checkpoint must win
    resumed.load_state_dict(state)
    for _ in range(4):
        resumed.train_step()
    assert resumed.images_seen == reference.images_seen == 7 * 16
    for key, value in weights(reference).items():
        assert torch.equal(weights(resumed)[key], value), key
    for opt in ("opt_g", "opt_d"):
        assert getattr(resumed, opt).param_groups[0]["lr"] == getattr(reference, opt).param_groups[0]["lr"]


def test_the_scheduled_settings_are_in_the_logged_statistics(digits):
    cfg = override(preset("debug"), [*BASE, *SCHEDULE])
    loop = make_loop(cfg, digits)
    for _ in range(2):
        loop.train_step()
    stats = loop.read_stats()
    now = settings_at(cfg, 16)  # the last step started after 16 images
    assert stats["schedule/lr_g"] == now.lr_g and stats["schedule/lr_d"] == now.lr_d
    assert stats["schedule/beta2"] == now.beta2 and stats["schedule/ema_half_life_kimg"] == now.ema_half_life_kimg
    assert stats["schedule/gamma"] == pytest.approx(1.0 * now.gamma_scale) and 0.1 < now.gamma_scale < 1
    assert all(isinstance(v, float) for v in stats.values())
    plain = make_loop(override(preset("debug"), BASE), digits)
    plain.train_step()
    assert not any(key.startswith("schedule/") for key in plain.read_stats())


class Recorder(Tracker):
    def __init__(self) -> None:
        self.logged: dict[str, list[float]] = {}

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.logged.setdefault(key, []).append(value)

    log_curves = log_metrics


def test_the_trainer_logs_the_schedule_and_a_run_resumed_from_disk_continues_it(digits, tmp_path):
    cfg = override(
        preset("debug"),
        [*BASE, *SCHEDULE, "train.total_kimg=0.192", "eval.every_kimg=0.064", "train.log_every_steps=2"],
    )
    recorder = Recorder()
    straight = Trainer(cfg, LocalSession(str(tmp_path / "a"), quiet=True), data=digits, tracker=recorder)
    straight.train()
    lrs = recorder.logged["schedule/lr_g"]
    assert len(lrs) >= 4 and lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(5e-5)
    assert recorder.logged["schedule/beta2"][-1] == pytest.approx(0.99)

    class KilledAfterStep4(LocalSession):
        def report(self, metrics, snapshot):
            super().report(metrics, snapshot)
            if metrics["step"] == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, KilledAfterStep4(str(tmp_path / "b"), quiet=True), data=digits).train()
    resumed = Trainer(cfg, LocalSession(str(tmp_path / "b"), resume=True, quiet=True), data=digits)
    assert resumed.loop.step == 4
    resumed.train()
    a, _ = checkpoint.load(checkpoint.find(str(tmp_path / "a")).latest)
    b, _ = checkpoint.load(checkpoint.find(str(tmp_path / "b")).latest)
    assert a["loop"]["step"] == b["loop"]["step"] == 12
    for net in ("G", "D", "G_ema"):
        for key, value in a["loop"][net].items():
            assert torch.equal(b["loop"][net][key], value), f"{net}.{key}"


def test_the_captured_step_follows_the_schedule():
    sets = [*SETS, *SCHEDULE]
    eager, captured = build(sets), build(sets, emulate=True)
    lr_tensor = captured.opt_g.param_groups[0]["lr"]
    for _ in range(10):  # warm-up, then the graphs, while every value moves
        eager.train_step()
        captured.train_step()
    assert set(captured.captured.graphs) == {"d", "g"}
    assert captured.opt_g.param_groups[0]["lr"] is lr_tensor  # refilled, never replaced
    assert lr_tensor.item() == pytest.approx(5e-5)
    assert captured.opt_d.param_groups[0]["betas"][1].item() == pytest.approx(0.99)
    assert captured.captured.ema_beta.item() == pytest.approx(ema_beta(16, 0.5))
    assert_trains_alike(eager, captured)


def test_pbt_changes_a_schedules_end_on_a_running_loop(digits):
    ends = {"schedule.lr_final", "schedule.gamma_final", "schedule.beta2_final", "schedule.ema_half_life_final_kimg"}
    assert ends <= set(MUTABLE)
    cfg = override(preset("debug"), [*BASE, *SCHEDULE])
    loop = make_loop(cfg, digits)
    for _ in range(9):  # the ninth step starts at the schedule's end
        loop.train_step()
    assert loop.opt_g.param_groups[0]["lr"] == pytest.approx(5e-5)
    loop.set_hyperparameters(override(cfg, ["schedule.lr_final=0.5", "schedule.gamma_final=0.5"]))
    loop.train_step()
    assert [opt.param_groups[0]["lr"] for opt in (loop.opt_g, loop.opt_d)] == pytest.approx([1e-4, 1e-4])
    assert loop.loss.gamma_scale == pytest.approx(0.5)


def test_schedule_keys_are_searchable_and_pbt_may_perturb_their_ends():
    base = preset("modern-32-gpu")
    key, spec = spaces.parse_override("schedule.lr_final=uniform:0.1:1")
    space = spaces.build_space(base, {key: spec, "schedule.kimg": {"choice": [0, 1000, 2500]}})
    assert space["schedule.lr_final"].values == (0.1, 1.0)
    pbt = spaces.build_space(base, {"schedule.gamma_final": {"loguniform": [0.05, 1]}, "optim.lr_g": 2e-4})
    spaces.check_mutable(pbt)
    with pytest.raises(ConfigError, match="--scheduler pbt copies weights between trials.*schedule.kimg"):
        spaces.check_mutable(space)
    with pytest.raises(ConfigError, match=r"space schedule.beta2_final=uniform\[0.9, 1\]: schedule.beta2_final=1"):
        spaces.build_space(base, {"schedule.beta2_final": {"uniform": [0.9, 1.0]}})
