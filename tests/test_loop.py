import math

import pytest
import torch

from gan.core.augment import DiffAugment, translate
from gan.core.config import override
from gan.core.loop import DivergenceError, GANLoop, Nets, ema_beta, make_ema, update_ema
from gan.core.models import build_models
from gan.data.datasets import ImageDataset
from gan.evaluation.backbone import load_digit_classifier


def make_loop(cfg, data, seed=0):
    torch.manual_seed(seed)
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)
    return GANLoop(cfg, Nets(G, D, make_ema(G), G, D), data)


def params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_ema_half_life_in_images():
    beta = ema_beta(batch_size=64, half_life_kimg=1.0)
    assert beta ** (1000 / 64) == pytest.approx(0.5)
    assert ema_beta(64, 0.0) == 0.0


def test_update_ema_moves_towards_model():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.9 * params(a) + 0.1 * params(b)
    update_ema(a, b, beta=0.9)
    assert torch.allclose(params(a), expected)


def test_translation_moves_pixels_and_zero_shift_is_identity():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    zero = translate(x, lambda lo, hi, n: torch.zeros(n, dtype=torch.long), 0.125)
    assert torch.equal(zero, x)
    moved = translate(x, lambda lo, hi, n: torch.ones(n, dtype=torch.long), 0.125)
    assert moved[0, 0, 5, 5] == 1.0 and moved.sum() == 1.0


def test_augmentation_keeps_what_the_digit_is(digits):
    """Digit-safe: the evaluator still reads augmented digits as the same class."""
    model, _ = load_digit_classifier()
    idx = torch.arange(0, 5000, 5)
    real = digits.to_float(idx)
    augment = DiffAugment("translation,cutout", torch.Generator().manual_seed(0))
    images = augment(real).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        acc = (model(images).argmax(1) == digits.labels[idx]).float().mean().item()
    assert acc > 0.93
    assert augment(real).shape == real.shape


def test_training_is_seeded_and_changes_parameters(tiny_cfg, digits):
    a, b = make_loop(tiny_cfg, digits), make_loop(tiny_cfg, digits)
    before = params(a.nets.G).clone()
    for _ in range(3):
        a.train_step()
        b.train_step()
    stats = a.read_stats()
    assert {"loss/d", "loss/g", "d/real", "d/fake"} <= set(stats)
    assert all(math.isfinite(v) for v in stats.values())
    assert not torch.equal(params(a.nets.G), before)
    assert torch.equal(params(a.nets.G), params(b.nets.G)) and torch.equal(params(a.nets.D), params(b.nets.D))
    assert a.images_seen == 3 * tiny_cfg.train.batch_size


@pytest.mark.parametrize("kind", ["ns", "hinge", "wgan-gp"])
def test_every_loss_and_r1_trains(tiny_cfg, digits, kind):
    cfg = override(tiny_cfg, [f"loss.kind={kind}", "loss.r1_gamma=1", "loss.r1_every=1", "model.d_norm=none"])
    loop = make_loop(cfg, digits)
    loop.train_step()
    stats = loop.read_stats()
    assert "loss/d/r1" in stats and all(math.isfinite(v) for v in stats.values())
    assert ("loss/d/gp" in stats) == (kind == "wgan-gp")


def test_resume_is_bit_for_bit(tiny_cfg, digits):
    reference = make_loop(tiny_cfg, digits)
    for _ in range(4):
        reference.train_step()
    state = {k: v for k, v in reference.state_dict().items()}
    state = torch.load(_roundtrip(state), weights_only=True)
    for _ in range(3):
        reference.train_step()
    resumed = make_loop(tiny_cfg, digits, seed=99)  # different init: the state must win
    resumed.load_state_dict(state)
    for _ in range(3):
        resumed.train_step()
    assert resumed.step == reference.step == 7
    for name in ("G", "D", "G_ema"):
        assert torch.equal(params(getattr(resumed.nets, name)), params(getattr(reference.nets, name)))


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_divergence_is_detected_with_the_step(tiny_cfg, digits):
    """Steps do not read values; the read at a later (logging) step names the bad one."""
    loop = make_loop(tiny_cfg, digits)
    loop.train_step()
    with torch.no_grad():
        next(loop.nets.D.parameters()).fill_(float("nan"))
    for _ in range(3):
        loop.train_step()  # no exception here: nothing waits for the device
    with pytest.raises(DivergenceError, match=r"loss/d.* became NaN/Inf at step 2 \(32 images seen\)"):
        loop.read_stats()


def test_first_bad_step_is_the_earliest_over_ranks(tiny_cfg, digits):
    loop = make_loop(tiny_cfg, digits)
    loop.train_step()
    # Another rank saw a NaN at step 1: its row of the gather says so.
    other = lambda t: torch.cat([t, t.clone().index_fill_(1, torch.tensor([t.shape[1] - 1]), 1.0)])
    loop.all_gather = other
    with pytest.raises(DivergenceError, match="at step 1"):
        loop.read_stats()


def test_batch_must_divide_over_workers(tiny_cfg, digits):
    G, D = build_models(tiny_cfg.model, 28, 1)
    with pytest.raises(ValueError, match="must divide evenly over 3 workers"):
        GANLoop(tiny_cfg, Nets(G, D, make_ema(G), G, D), digits, world_size=3)


def test_epochs_reshuffle(tiny_cfg):
    images = torch.arange(32, dtype=torch.uint8).view(32, 1, 1, 1).expand(32, 1, 28, 28).contiguous()
    data = ImageDataset(images, torch.zeros(32, dtype=torch.long), "x", "synthetic")
    loop = make_loop(tiny_cfg, data)
    first = loop.perm.clone()
    loop.train_step()
    loop.train_step()
    loop.train_step()  # 3 x 16 > 32: a new epoch began
    assert loop.epoch == 1 and not torch.equal(first, loop.perm)


def test_fake_labels_follow_the_data_class_mix(tiny_cfg):
    # 90% class 0, 10% class 2, none of the other 8: G is asked for each class as often as
    # the data shows it, so D cannot tell fakes by their labels alone.
    labels = torch.tensor([0] * 90 + [2] * 10)
    loop = make_loop(tiny_cfg, ImageDataset(torch.zeros(100, 1, 28, 28, dtype=torch.uint8), labels, "x", "synthetic"))
    drawn = torch.cat([loop._latents()[1] for _ in range(500)])
    counts = torch.bincount(drawn, minlength=10)
    assert counts[1] == 0 and counts[3:].sum() == 0
    assert abs(counts[0] / len(drawn) - 0.9) < 0.02  # 8,000 draws: about 6 standard errors


def test_bf16_autocast_trains_and_keeps_float32_state(tiny_cfg, digits):
    cfg = override(tiny_cfg, ["train.bf16=true", "loss.r1_gamma=1", "loss.r1_every=1"])
    loop = make_loop(cfg, digits)
    before = params(loop.nets.G).clone()
    loop.train_step()
    stats = loop.read_stats()
    assert all(math.isfinite(v) for v in stats.values())
    assert not torch.equal(params(loop.nets.G), before)
    assert all(p.dtype == torch.float32 for p in loop.nets.G.parameters())


def test_foreach_ema_is_the_same_numbers(tiny_cfg):
    G, _ = build_models(tiny_cfg.model, 28, 1)
    a, b = make_ema(G), make_ema(G)
    before = params(a).clone()
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p))
    for module in G.modules():  # buffers change too (BN statistics)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.add_(1.0)
    update_ema(a, G, 0.9, foreach=False)
    update_ema(b, G, 0.9, foreach=True)
    assert not torch.equal(params(a), before)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("sets", [["optim.adam_impl=fused"], ["optim.adam_impl=foreach"], ["train.channels_last=true"]])
def test_speed_options_train_like_the_defaults(tiny_cfg, digits, sets):
    """Same maths, other kernels: 3 steps land within 1e-5 of the default loop (measured:
    foreach 0, fused 6e-8, channels_last 7e-7; Adam moves parameters 6e-4 in 3 steps).
    G without batch norm here: a conv bias in front of batch norm has a zero gradient up
    to float noise, which Adam's first steps turn into +-lr, whatever the kernel."""
    cfg = override(tiny_cfg, ["model.g_norm=none"])
    reference, fast = make_loop(cfg, digits), make_loop(override(cfg, sets), digits)
    if "train.channels_last=true" in sets:  # the Trainer converts the models; make_loop does not
        fast.nets.G.to(memory_format=torch.channels_last)
        fast.nets.D.to(memory_format=torch.channels_last)
    start = params(reference.nets.G).clone()
    for _ in range(3):
        reference.train_step()
        fast.train_step()
    for name in ("G", "D", "G_ema"):
        torch.testing.assert_close(
            params(getattr(fast.nets, name)), params(getattr(reference.nets, name)), rtol=0, atol=1e-5
        )
    assert (params(reference.nets.G) - start).abs().max() > 1e-4


def test_old_configs_load_with_the_new_fields_defaulted(tiny_cfg):
    from gan.core.config import Config

    raw = tiny_cfg.to_dict()
    for field in ("compile", "channels_last", "foreach_ema", "sync_batchnorm", "tf32", "cudnn_benchmark"):
        del raw["train"][field]
    del raw["optim"]["adam_impl"]
    cfg = Config.from_dict(raw)
    assert cfg.optim.adam_impl == "auto" and not cfg.train.compile and cfg.train.sync_batchnorm


def test_backend_flags_act_on_cuda_only(tiny_cfg):
    from gan.runs.trainer import configure_backends

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = False
        configure_backends(tiny_cfg.train, torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
        configure_backends(tiny_cfg.train, torch.device("cuda"))  # only sets flags: no GPU needed
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
        off = override(tiny_cfg, ["train.tf32=false", "train.cudnn_benchmark=false"])
        configure_backends(off.train, torch.device("cuda"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def test_bad_adam_impl_is_refused(tiny_cfg):
    from gan.core.config import ConfigError

    with pytest.raises(ConfigError, match="optim.adam_impl='fast' is not allowed: choose one of auto"):
        override(tiny_cfg, ["optim.adam_impl=fast"])
