"""Adaptive discriminator augmentation (StyleGAN2-ADA): the pipeline and the controller of p."""

import io

import pytest
import torch
import torch.nn.functional as F

from gan.core.augment import AdaptiveAugment, AugmentController


@pytest.fixture
def one_thread():
    """The memorisation runs are hundreds of tiny steps: threads only contend on a busy host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def augment(seed=0, p=1.0, **kwargs):
    return AdaptiveAugment(torch.Generator().manual_seed(seed), p=torch.tensor(p), **kwargs)


def images(n, channels=3, size=8, seed=0):
    """Smooth random images in [-1, 1]: low-resolution noise, upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, channels, max(2, size // 2), max(2, size // 2), generator=g)
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False).clamp(-1, 1)


@pytest.mark.parametrize("channels, flips", [(3, True), (3, False), (1, True)])
def test_p_zero_is_the_identity_exactly(channels, flips):
    x = images(6, channels, size=12)
    assert torch.equal(augment(p=0.0, flips=flips)(x), x)


def test_p_zero_and_one_draw_the_same_random_numbers():
    """The draws depend on the images' shape only: every rank and every captured replay stays in step."""
    a, b = augment(p=0.0, flips=True), augment(p=1.0, flips=True)
    a(images(4)), b(images(4))
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3])
def test_p_one_changes_every_image_and_keeps_shape_and_dtype(channels, dtype):
    x = images(16, channels, size=10).to(dtype)
    y = augment(p=1.0, flips=True)(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert ((y - x).flatten(1).abs().amax(1) > 1e-3).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_gradients_flow_to_the_images(channels):
    """Exact gradients (gradcheck against finite differences), the same draws each call."""
    x = images(2, channels, size=6).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: augment(seed=1, p=1.0, flips=True)(x), (x,))


def test_r1_penalty_can_be_taken_through_the_augmentation():
    """R1's double backward reaches D's weights through the resampling."""
    D = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16), torch.nn.Softplus(), torch.nn.Linear(16, 1)
    )
    x = images(4).requires_grad_()
    (grad,) = torch.autograd.grad(D(augment(p=1.0)(x)).sum(), x, create_graph=True)
    grad.square().sum().backward()
    assert all(layer.weight.grad.abs().sum() > 0 for layer in (D[1], D[3]))  # biases do not shape the gradient


def test_rank_slices_equal_the_one_process_global_batch():
    x = images(8, size=12)
    whole = augment(seed=5, p=0.7, flips=True)(x)
    parts = [
        AdaptiveAugment(torch.Generator().manual_seed(5), rank, 2, p=torch.tensor(0.7), flips=True)(x[4 * rank : 4 * rank + 4])
        for rank in (0, 1)
    ]  # fmt: skip
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-6)


def shifted_copies(x, most):
    """Every integer translation of x by up to ``most`` pixels, with reflection at the border."""
    padded = F.pad(x, [most] * 4, mode="reflect")
    h, w = x.shape[-2:]
    return [padded[..., dy : dy + h, dx : dx + w] for dy in range(2 * most + 1) for dx in range(2 * most + 1)]


@pytest.mark.parametrize("flips", [False, True])
def test_blits_flip_or_turn_only_when_allowed(flips):
    x = images(1, size=16).expand(64, -1, -1, -1)  # no symmetry: a mirror is never a shift
    y = augment(p=1.0, groups="blit", flips=flips)(x)
    shifts = shifted_copies(x[:1], most=2)  # 16 / 8
    only_shifted = [any(torch.equal(image, s[0]) for s in shifts) for image in y]
    assert all(only_shifted) if not flips else not all(only_shifted)


def logits(signs):
    return torch.tensor(signs, dtype=torch.float32)


def test_p_rises_at_the_set_speed_while_d_is_sure_of_the_reals():
    """Mean sign +1 > target: p moves by batch * interval / (speed_kimg * 1000) per interval,
    so it goes from 0 to 1 in speed_kimg * 1000 images, and no further."""
    p = torch.zeros(())
    batch, interval = 64, 4
    controller = AugmentController(p, batch, target=0.6, speed_kimg=2.56, interval=interval)
    history = []
    for step in range(1, 50):
        controller.observe(torch.ones(batch))
        controller.step(step * batch)
        history.append(p.item())
    assert history[:3] == [0.0, 0.0, 0.0] and history[3] == pytest.approx(0.1)  # one move per interval
    assert history[7] == pytest.approx(0.2) and history[8] == history[7]
    assert history[35] == pytest.approx(0.9, abs=1e-6)
    assert history[39] == pytest.approx(1.0, abs=1e-6) and 2560 == 40 * batch  # 0 -> 1 in 2.56 kimg
    assert history[-1] == 1.0  # clamped
    assert controller.stats()["augment/rt"].item() == 1.0


def test_p_stays_at_zero_when_d_cannot_tell_and_falls_when_it_stops_overfitting():
    p = torch.zeros(())
    controller = AugmentController(p, 8, target=0.6, speed_kimg=0.32, interval=2)  # 0.05 per interval
    for step in range(1, 21):
        controller.observe(logits([3.0, -1.0, 0.5, -2.0, 1.0, -0.1, 2.0, -4.0]))  # mean sign 0
        controller.step(step * 8)
    assert p.item() == 0.0 and controller.rt.item() == 0.0
    p.fill_(0.5)
    for step in range(21, 25):
        controller.observe(logits([1.0] * 6 + [-1.0] * 2))  # mean sign 0.5 < 0.6
        controller.step(step * 8)
    assert p.item() == pytest.approx(0.4)


def test_signs_of_all_ranks_are_pooled():
    """This rank's D is sure of its reals, the other's is not: pooled, r_t = 0 and p stays."""
    other_rank = torch.tensor([[-8.0, 8.0]])  # sum of signs, count
    p = torch.zeros(())
    controller = AugmentController(p, 16, interval=1, all_gather=lambda t: torch.cat([t, other_rank]))
    controller.observe(torch.ones(8))
    controller.step(16)
    assert controller.rt.item() == 0.0 and p.item() == 0.0


def test_schedule_sets_p_from_images_seen():
    p = torch.zeros(())
    controller = AugmentController(p, 32, target=None, schedule=lambda seen: seen / 1000, interval=2)
    for step in range(1, 41):
        controller.observe(torch.ones(32))  # an overfitting D does not move a scheduled p
        controller.step(step * 32)
        assert p.item() == pytest.approx(min(step * 32 / 1000, 1.0))
    assert controller.rt.item() == 1.0  # still measured, for the log


def test_controller_rejects_settings_it_cannot_honour():
    with pytest.raises(ValueError, match="not both"):
        AugmentController(torch.zeros(()), 8, target=0.6, schedule=lambda n: 0.1)
    with pytest.raises(ValueError, match="target"):
        AugmentController(torch.zeros(()), 8, target=1.5)
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment(groups="blit,cutout")


def test_resume_continues_bit_for_bit():
    """Stopped mid-interval and restored from a saved state: the same p, r_t and augmented images."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(16, generator=g) + 1.0 for _ in range(30)]
    x = images(8)

    def build():
        aug = augment(seed=9, p=0.0, flips=True)
        return aug, AugmentController(aug.p, 16, target=0.6, speed_kimg=0.5, interval=4)

    def run(aug, controller, steps):
        out = []
        for step in steps:
            y = aug(x)
            controller.observe(batches[step])
            controller.step((step + 1) * 16)
            out.append((y, controller.p.clone(), controller.rt.clone()))
        return out

    aug, controller = build()
    run(aug, controller, range(10))  # 10 steps: two moves and half an interval
    buffer = io.BytesIO()
    torch.save({"ada": controller.state_dict(), "rng": aug.generator.get_state()}, buffer)
    straight = run(aug, controller, range(10, 30))
    assert straight[-1][1].item() > 0  # p moved after the save
    buffer.seek(0)
    saved = torch.load(buffer)
    aug, resumed = build()
    resumed.load_state_dict(saved["ada"])
    aug.generator.set_state(saved["rng"])
    assert aug.p is resumed.p  # loaded in place: the pipeline (and a captured graph) reads it
    for a, b in zip(straight, run(aug, resumed, range(10, 30)), strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def memorising_run(num_reals, steps=300, batch=32, seed=0):
    """A small D learns to tell reals from a perfect G's images (the same distribution) with ADA on.
    It can beat chance only by memorising its reals; returns the p of every step."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    reals = images(num_reals, seed=seed + 1)
    D = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 256), torch.nn.LeakyReLU(0.2), torch.nn.Linear(256, 1)
    )
    opt = torch.optim.Adam(D.parameters(), lr=2e-3)
    aug = augment(seed=seed + 2, p=0.0)
    controller = AugmentController(aug.p, batch, target=0.6, speed_kimg=2.0, interval=4)
    history = []
    for step in range(steps):
        real = reals[torch.randint(num_reals, (batch,), generator=g)]
        fake = images(batch, seed=seed * 100_000 + step + 10)
        real_logits = D(aug(real))
        loss = F.softplus(-real_logits).mean() + F.softplus(D(aug(fake))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        controller.observe(real_logits)
        controller.step((step + 1) * batch)
        history.append(aug.p.item())
    return history


def test_p_rises_on_a_tiny_dataset_d_memorises_and_stays_near_zero_on_a_large_one(one_thread):
    tiny, large = memorising_run(16), memorising_run(8192)
    assert tiny[-1] >= 0.15, f"p on 16 images ended at {tiny[-1]}"
    assert max(large) <= 0.05, f"p on 8192 images reached {max(large)}"


# --- through the training loop (loss.ada) ---------------------------------------------------
def ada_loop(sets, data, seed=0):
    from gan.core.config import debug, override
    from gan.core.loop import GANLoop, Nets, make_ema
    from gan.core.models import build_models

    cfg = override(debug(), sets)
    torch.manual_seed(seed)
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)
    return GANLoop(cfg, Nets(G, D, make_ema(G), G, D), data)


ADA = ["loss.ada=blit,geom,color", "loss.ada_speed_kimg=0.5"]


def off_grid(x: torch.Tensor) -> float:
    """How far the pixels are from the dataset's 256 values in [-1, 1]: 0 for real images."""
    return (x * 127.5 + 127.5 - (x * 127.5 + 127.5).round()).abs().max().item()


@pytest.mark.parametrize("d_steps", [1, 2])
def test_the_loop_steers_p_logs_it_and_d_sees_augmented_reals(digits, one_thread, d_steps):
    loop = ada_loop([*ADA, "loss.ada_p=0.5", f"optim.d_steps={d_steps}"], digits)
    reals = []  # (before, after) the augmentation, for the images that were real
    augment = loop.loss.augment
    loop.loss.augment = lambda x: (lambda y: (reals.append((x, y)) if off_grid(x) == 0 else None, y)[1])(augment(x))
    for _ in range(12):
        loop.train_step()
    stats = loop.read_stats()
    # D wins at the end, so r_t is above the target; p has moved from 0.5 in steps of the real
    # images D saw in 4 steps (16 x d_steps each) over 500.
    assert stats["augment/rt"] > 0.6
    steps = (stats["augment/p"] - 0.5) / (64 * d_steps / 500)
    assert steps == pytest.approx(round(steps), abs=1e-4)
    assert loop.ada.p.item() == stats["augment/p"]
    # With p > 0 the geometric and colour transforms take real images off the pixel grid.
    assert len(reals) >= 12 * d_steps and max(off_grid(after) for _, after in reals) > 0.01


def test_ada_p_and_its_signal_resume_bit_for_bit(digits, one_thread):
    sets = ADA + ["loss.ada_p=0.3", "loss.r1_gamma=1", "loss.r1_every=3"]
    reference = ada_loop(sets, digits)
    for _ in range(6):
        reference.train_step()
    saved_p = reference.ada.p.item()
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    for _ in range(7):
        reference.train_step()
    resumed = ada_loop(sets, digits, seed=5)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.ada.p.item() == saved_p != 0.3
    for _ in range(7):
        resumed.train_step()
    assert torch.equal(resumed.ada.p, reference.ada.p) and torch.equal(resumed.ada.rt, reference.ada.rt)
    for name in ("G", "D", "G_ema"):
        a, b = getattr(reference.nets, name), getattr(resumed.nets, name)
        assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_several_workers_resume_p_and_start_a_new_interval():
    """A checkpoint holds rank 0's signs of the interval in progress: one process takes them up,
    several workers drop them (rank 0's alone would stand for all)."""
    saved = AugmentController(torch.tensor(0.3), 16, interval=4)
    saved.observe(torch.ones(16))
    saved.step()
    state = saved.state_dict()
    for interval, expected in ((True, (16.0, 16.0, 1)), (False, (0.0, 0.0, 0))):
        resumed = AugmentController(torch.tensor(0.0), 16, interval=4)
        resumed.load_state_dict(state, interval=interval)
        assert resumed.p.item() == pytest.approx(0.3)
        assert (resumed._sign_sum.item(), resumed._count.item(), resumed._steps) == expected


def test_fixed_p_ramps_over_its_images(digits, one_thread):
    loop = ada_loop(["loss.ada=color", "loss.ada_target=0", "loss.ada_p=0.5", "loss.ada_ramp_kimg=0.32"], digits)
    assert loop.ada.p.item() == 0
    for _ in range(10):  # 160 of the 320 images
        loop.train_step()
    assert loop.ada.p.item() == pytest.approx(0.25)
    for _ in range(20):
        loop.train_step()
    assert loop.ada.p.item() == pytest.approx(0.5)


def test_relativistic_signal_is_the_paired_difference():
    seen = []
    from gan.core.config import LossConfig
    from gan.core.losses import GANLoss

    loss = GANLoss(LossConfig(kind="rpgan"), observe=seen.append)
    D = lambda x, labels=None: x.flatten(1).mean(1, keepdim=True)  # noqa: E731
    real, fake = torch.full((4, 1, 2, 2), 2.0, requires_grad=True), torch.full((4, 1, 2, 2), 3.0)
    loss.d_main(D, real, None, fake, None)
    assert torch.equal(seen[0], torch.full((4, 1), -1.0))


@pytest.mark.parametrize(
    "sets, message",
    [
        (["loss.ada=blit,warp"], "loss.ada='warp'"),
        (["loss.ada=blit", "loss.augment=translation"], "choose one"),
        (["loss.ada=blit", "loss.ada_target=1"], "loss.ada_target"),
        (["loss.ada=blit", "loss.ada_p=1.5"], "loss.ada_p"),
        (["loss.ada=blit", "loss.ada_speed_kimg=0"], "loss.ada_speed_kimg"),
        (["loss.ada_p=0.3"], "loss.ada_p is set but loss.ada is ''"),
        (["loss.ada=blit", "loss.ada_ramp_kimg=10"], "set loss.ada_target=0 for the schedule"),
        (["loss.ada=blit", "loss.ada_target=0"], "leave p at 0"),
        (["loss.ada=blit", "loss.kind=wgan-gp"], "unbounded critic"),
    ],
)
def test_bad_ada_settings_are_refused_in_one_line(sets, message):
    from gan.core.config import ConfigError, debug, override

    with pytest.raises(ConfigError, match=message) as err:
        override(debug(), sets)
    assert "\n" not in str(err.value)
