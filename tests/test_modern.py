"""The modern family (R3GAN: Huang et al. 2024) and its loss: relativistic pairing with R1 and
R2, checked against finite differences and hand computations; the architecture's fix-up
initialisation and [1,2,1] resampling; the presets, 128 px end to end, and training that
learns the digits and their classes."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from gan.core.config import PRESETS, Config, ConfigError, LossConfig, ModelConfig, override, preset, stage_sides
from gan.core.losses import GANLoss, d_adversarial, g_adversarial
from gan.core.models import ModernBlock, Resample, build_models, resample_kernel
from gan.runs.session import LocalSession
from gan.runs.trainer import Trainer

MODERN = ["model.family=modern", "model.g_norm=none", "model.d_norm=none", "model.minibatch_std=false", "model.depth=1"]
R3GAN = [*MODERN, "loss.kind=rpgan", "loss.r1_gamma=0.1", "loss.r2_gamma=0.1"]


def tiny(**changes) -> ModelConfig:
    """A modern G and D small enough to differentiate by finite differences."""
    base = dict(family="modern", z_dim=8, width=4, depth=1, group_width=4, g_norm="none", d_norm="none",
                minibatch_std=False)  # fmt: skip
    return ModelConfig(**(base | changes))


def nonlinear(module: nn.Module, seed: int = 0) -> nn.Module:
    """The module with every block's last layer drawn at random (fix-up starts them at zero,
    where D is linear and its input gradient the same everywhere), in float64."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in module.modules():
            if isinstance(block, ModernBlock):
                block.project.weight.copy_(torch.randn(block.project.weight.shape, generator=g) * 0.5)
    return module.double()


# --- the loss ----------------------------------------------------------------------------
def finite_difference_sq_norm(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Per-sample ||grad f(x_i)||^2 from central differences, one pixel at a time."""
    n, dims = x.shape[0], x[0].numel()
    eye = torch.eye(dims, dtype=x.dtype).view(dims, *x.shape[1:]) * h
    out = []
    for i in range(n):
        with torch.no_grad():
            up, down = f(x[i] + eye), f(x[i] - eye)
        out.append(((up - down) / (2 * h)).square().sum())
    return torch.stack(out)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_r1_and_r2_equal_finite_difference_estimates_through_the_augmentation(num_classes):
    """R1 = gamma1/2 E ||grad_x D(aug(x))||^2 at the real images, R2 the same with gamma2 at the
    generated ones: differentiated at the images before augmentation (as R3GAN and StyleGAN2-ADA
    do), by a D that is not linear."""
    torch.manual_seed(0)
    _, D = build_models(tiny(num_classes=num_classes), 28, 1)
    D = nonlinear(D)
    aug = lambda x: 0.5 * x.flip(3) + 0.25  # noqa: E731  a fixed, linear augmentation
    real, fake = torch.rand(2, 1, 28, 28, dtype=torch.float64) * 2 - 1, torch.rand(2, 1, 28, 28, dtype=torch.float64)
    real_labels, fake_labels = (torch.tensor([1, 5]), torch.tensor([0, 3])) if num_classes else (None, None)

    def at(labels, i):
        return lambda x: D(aug(x), None if labels is None else labels[i : i + 1].expand(len(x)))

    r1_fd = torch.stack([finite_difference_sq_norm(at(real_labels, i), real[i : i + 1])[0] for i in range(2)])
    r2_fd = torch.stack([finite_difference_sq_norm(at(fake_labels, i), fake[i : i + 1])[0] for i in range(2)])
    assert r1_fd.min() > 0 and not torch.allclose(r1_fd[0], r1_fd[1])  # varies: D is not linear

    for one_call in (False, True):
        loss = GANLoss(LossConfig(kind="rpgan", r1_gamma=0.3, r2_gamma=0.7, r1_every=4), aug, one_call=one_call)
        D.zero_grad()
        stats = loss.d_reg(D, real, real_labels, fake=fake, fake_labels=fake_labels)
        assert stats["loss/d/r1"].item() == pytest.approx(0.15 * r1_fd.mean().item(), rel=1e-6)
        assert stats["loss/d/r2"].item() == pytest.approx(0.35 * r2_fd.mean().item(), rel=1e-6)
        # The penalties train D, scaled by r1_every (lazy regularisation).
        weight = D.head.linear.weight
        grad, saved = weight.grad[0, 0].item(), weight.data[0, 0].item()
        values = []
        for shift in (1e-6, -1e-6):
            weight.data[0, 0] = saved + shift
            values.append(sum(loss.d_reg(D, real, real_labels, fake=fake, fake_labels=fake_labels).values()).item())
        weight.data[0, 0] = saved
        assert grad == pytest.approx(4 * (values[0] - values[1]) / 2e-6, rel=1e-4)


def test_r2_without_the_generated_images_is_refused_and_r1_alone_keeps_its_callers():
    _, D = build_models(tiny(), 28, 1)
    real = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="pass them to d_reg as fake="):
        GANLoss(LossConfig(r1_gamma=1, r2_gamma=1)).d_reg(D, real, None)
    assert set(GANLoss(LossConfig(r1_gamma=1)).d_reg(D, real, None)) == {"loss/d/r1"}


def test_relativistic_pairing_by_hand():
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 3.0])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    # D: softplus(-(real - fake)) pair by pair; G: softplus(-(fake - real)).
    d = (sp(1.0 - 2.0) + sp(1.0 + 1.0) + sp(3.0 - 0.5)) / 3
    g = (sp(2.0 - 1.0) + sp(-1.0 - 1.0) + sp(0.5 - 3.0)) / 3
    assert d_adversarial("rpgan", real, fake).item() == pytest.approx(d)
    assert g_adversarial("rpgan", fake, real).item() == pytest.approx(g)
    # Pairs, not means: the same logits paired otherwise give another loss.
    assert d_adversarial("rpgan", real.flip(0), fake).item() != pytest.approx(d)
    with pytest.raises(ValueError, match="pairs each generated image with a real one"):
        g_adversarial("rpgan", fake)
    with pytest.raises(ValueError, match="as many real as generated"):
        d_adversarial("rpgan", real[:2], fake)


@pytest.mark.parametrize("one_call", [False, True])
def test_rpgan_phases_score_each_generated_image_against_its_real_one(one_call):
    """d_main and g_main give the hand-computed loss of D's own logits, in one call of D or two,
    with the classification loss on the right images; g_main without real images is refused."""
    torch.manual_seed(0)
    G, D = build_models(tiny(num_classes=10), 28, 1)
    D = nonlinear(D).float()
    real, real_labels = torch.rand(4, 1, 28, 28) * 2 - 1, torch.tensor([0, 1, 2, 3])
    fake_labels = torch.tensor([9, 8, 7, 6])
    fake = G(torch.randn(4, 8), fake_labels).detach()
    real_logits, real_scores = D(real, real_labels, classes=True)
    fake_logits, fake_scores = D(fake, fake_labels, classes=True)

    loss = GANLoss(LossConfig(kind="rpgan", class_weight=0.5), one_call=one_call)
    d = loss.d_main(D, real, real_labels, fake, fake_labels)
    d_class = F.cross_entropy(real_scores, real_labels)
    expected = F.softplus(fake_logits - real_logits).mean() + 0.5 * d_class
    assert d["loss/d"].item() == pytest.approx(expected.item(), rel=1e-5)
    g = loss.g_main(D, fake, fake_labels, real=real, real_labels=real_labels)
    g_class = F.cross_entropy(fake_scores, fake_labels)
    assert g["loss/g/class"].item() == pytest.approx(g_class.item(), rel=1e-5)
    expected = F.softplus(real_logits - fake_logits).mean() + 0.5 * g_class
    assert g["loss/g"].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="pass g_main real="):
        loss.g_main(D, fake, fake_labels)


# --- the architecture --------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [28, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_modern_builds_at_every_resolution(resolution, channels, num_classes):
    G, D = build_models(tiny(num_classes=num_classes), resolution, channels)
    labels = torch.tensor([0, 4, 9]) if num_classes else None
    x = G(torch.randn(3, 8), labels)
    assert x.shape == (3, channels, resolution, resolution) and x.min() >= -1 and x.max() <= 1
    assert D(x, labels).shape == (3,)
    sides = stage_sides(resolution)
    assert sum(isinstance(m, Resample) and m.up for m in G.modules()) == len(sides) - 1
    assert sum(isinstance(m, Resample) and not m.up for m in D.modules()) == len(sides) - 1
    assert G.basis.shape == (4 * 2 ** (len(sides) - 1), sides[0], sides[0])  # the learned input
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in [*G.modules(), *D.modules()])
    if num_classes:
        logits, scores = D(x, labels, classes=True)
        assert scores.shape == (3, 10)
        torch.testing.assert_close(D(x, torch.full((3,), 7)) - logits, scores[:, 7] - scores.gather(1, labels[:, None])[:, 0])  # fmt: skip


def test_stage_widths_blocks_and_groups_are_what_the_config_says():
    cfg = tiny(stage_widths="48,32,16", stage_blocks="2,1,0", group_width=8, expansion=3)
    G, D = build_models(cfg, 28, 1)
    g_blocks = [[m for m in stage.modules() if isinstance(m, ModernBlock)] for stage in G.stages]
    assert [len(b) for b in g_blocks] == [2, 1, 0]
    assert [b[0].expand.in_channels for b in g_blocks[:2]] == [48, 32]
    mix = g_blocks[0][0].mix  # grouped 3x3: 48 * 3 channels in groups of 8
    assert (mix.kernel_size, mix.in_channels, mix.groups) == ((3, 3), 144, 18)
    d_blocks = [[m for m in stage.modules() if isinstance(m, ModernBlock)] for stage in D.stages]
    assert [len(b) for b in d_blocks] == [0, 1, 2]  # mirrored, full resolution first


def test_fixup_initialisation_makes_every_block_the_identity_and_the_networks_linear():
    """The last layer of each block starts at zero: blocks are the identity, so G is linear in
    its input up to the final tanh and D is linear in the image (its input gradient, and so R1,
    is the same at every image); only those last layers get a gradient at the first step."""
    torch.manual_seed(0)
    G, D = build_models(tiny(num_classes=10), 32, 3)
    G, D = G.double(), D.double()
    blocks = [m for m in [*G.modules(), *D.modules()] if isinstance(m, ModernBlock)]
    assert blocks and all(not b.project.weight.any() for b in blocks)
    h = torch.randn(2, blocks[0].expand.in_channels, 4, 4, dtype=torch.float64)
    assert torch.equal(blocks[0](h), h)

    z1, z2 = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (5,))
    pre = lambda z: torch.atanh(G(z, y))  # noqa: E731
    # Linear in (z, embedding): G(z1 + z2, y) = G(z1, y) + G(z2, y) - G(0, y), before the tanh.
    zero = torch.zeros_like(z1)
    torch.testing.assert_close(pre(z1 + z2), pre(z1) + pre(z2) - pre(zero))
    assert pre(zero).abs().min() > 0  # at z = 0 the class embedding alone draws an image

    x1, x2 = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randn(4, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([1, 2, 3, 4])
    zero_x = torch.zeros_like(x1)
    torch.testing.assert_close(D(x1 + x2, labels), D(x1, labels) + D(x2, labels) - D(zero_x, labels))
    r1 = GANLoss(LossConfig(r1_gamma=1.0, r2_gamma=1.0)).d_reg(D, x1, labels, fake=x2, fake_labels=labels)
    torch.testing.assert_close(r1["loss/d/r1"], r1["loss/d/r2"])

    D.zero_grad()
    D(x1, labels).sum().backward()
    assert all(b.project.weight.grad.abs().sum() > 0 for b in blocks if b in set(D.modules()))
    assert all(b.expand.weight.grad is None or not b.expand.weight.grad.any() for b in D.modules() if isinstance(b, ModernBlock))  # fmt: skip

    with torch.no_grad():  # a block whose last layer is not zero makes D nonlinear
        next(b for b in D.modules() if isinstance(b, ModernBlock)).project.weight.normal_()
    assert not torch.allclose(D(x1 + x2, labels), D(x1, labels) + D(x2, labels) - D(zero_x, labels))


def test_the_blocks_convolution_differentiates_once_and_twice_exactly():
    """The modern blocks' convolution takes its input gradient as a transposed convolution that
    autograd differentiates again (R1, R2): gradients of both orders match finite differences."""
    from gan.core.models import _Conv2dFn

    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: F.leaky_relu(_Conv2dFn.apply(x, w, b, 1, 2), 0.2)  # noqa: E731  3x3, 2 groups
    torch.testing.assert_close(f(x, w, b), F.leaky_relu(F.conv2d(x, w, b, padding=1, groups=2), 0.2))
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def _blur121(x: torch.Tensor) -> torch.Tensor:
    """[1,2,1]/4 along each axis, zero beyond the border."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = (p[..., :-2] + 2 * p[..., 1:-1] + p[..., 2:]) / 4
    return (rows[..., :-2, :] + 2 * rows[..., 1:-1, :] + rows[..., 2:, :]) / 4


def test_resampling_is_the_121_filter():
    """Up: nearest-neighbour x2 then the [1,2,1] blur; down: the blur then 2x2 averages."""
    assert torch.equal(resample_kernel() * 64, torch.tensor([1.0, 3, 3, 1])[:, None] * torch.tensor([1.0, 3, 3, 1]))
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    up = Resample(up=True).double()(x)
    torch.testing.assert_close(up, _blur121(F.interpolate(x, scale_factor=2, mode="nearest")))
    down = Resample(up=False).double()(x)
    torch.testing.assert_close(down, F.avg_pool2d(_blur121(x), 2))
    flat = torch.ones(1, 1, 8, 8)
    assert torch.allclose(Resample(up=True)(flat)[..., 1:-1, 1:-1], torch.ones(1, 1, 14, 14))  # keeps a flat image


def test_conditional_generator_and_discriminator_use_the_class():
    torch.manual_seed(0)
    G, D = build_models(tiny(num_classes=10), 28, 1)
    z = torch.randn(4, 8).repeat(2, 1)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    x = G(z, labels)
    assert not torch.allclose(x[:4], x[4:])  # same z, other class: another image
    assert not torch.allclose(D(x, labels), D(x, labels.roll(1)))
    for net, args in ((G, (z,)), (D, (x,))):
        with pytest.raises(ValueError, match="class-conditional"):
            net(*args)


# --- configuration and presets -----------------------------------------------------------
@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["model.family=modern"], "has no normalisation layers and no minibatch-std: set model.g_norm=none"),
        ([*MODERN, "model.stage_widths=64,32"], r"has 2 values but 28 px has 3 stages \(7, 14, 28 px\): give 3"),
        ([*MODERN, "model.stage_blocks=1,1"], r"model\.stage_blocks='1,1' has 2 values but 28 px has 3 stages"),
        ([*MODERN, "model.stage_widths=64,x,16"], "give whole numbers separated by commas"),
        ([*MODERN, "model.width=12"], r"model\.group_width=16 does not divide a stage's 12 x model\.expansion=2"),
        ([*MODERN, "model.depth=0"], r"model\.depth=0 is not allowed: must be >= 1 for model\.family='modern'"),
        ([*MODERN, "model.stage_blocks=0,0,0"], "must hold at least one block"),
        (["model.stage_widths=64,32,16"], "is for model.family='modern', not 'dcgan'"),
        (["loss.r2_gamma=1"], r"loss\.r2_gamma=1 needs loss\.r1_gamma > 0"),
        (["loss.kind=rpgan", "model.d_norm=batch"], "loss.kind='rpgan' with model.d_norm='batch' is not allowed"),
    ],
)
def test_bad_modern_settings_are_refused_in_one_line(tiny_cfg, sets, message):
    with pytest.raises(ConfigError, match=message) as err:
        override(tiny_cfg, sets)
    assert "\n" not in str(err.value)


MODERN_PRESETS = [name for name in PRESETS if name.startswith("modern-")]


@pytest.mark.parametrize("name", MODERN_PRESETS)
def test_modern_presets_build_rgb_models_at_their_size(name):
    cfg = preset(name)
    assert cfg.name == name and cfg.model.family == "modern" and cfg.loss.kind == "rpgan"
    assert cfg.loss.r1_gamma == cfg.loss.r2_gamma > 0  # one gamma for R1 and R2, as R3GAN
    assert cfg.data.channels == 3 and cfg.eval.backbone == "classifier" and "flip" not in cfg.loss.augment
    assert bool(cfg.model.num_classes) == ("-cond" in name) and Config.from_json(cfg.to_json()) == cfg
    if name.endswith("-gpu"):
        assert cfg.model.group_width == 16 and set(cfg.model.stage_blocks.split(",")) == {"2"}
        assert cfg.model.stage_widths.startswith("768,768,768,768")
        return
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)
    labels = torch.tensor([0, 9]) if cfg.model.num_classes else None
    with torch.no_grad():
        x = G(torch.randn(2, cfg.model.z_dim), labels)
        assert x.shape == (2, 3, cfg.data.resolution, cfg.data.resolution) and D(x, labels).shape == (2,)
    assert sum(p.numel() for p in [*G.parameters(), *D.parameters()]) < 600_000  # trains on 2 CPU cores


def test_the_gpu_presets_hold_the_papers_networks():
    """CIFAR-10's R3GAN: about 20.6 M parameters per network (blocks of 768 -> 1,536 in 96
    groups -> 768, two per stage, four stages)."""
    cfg = preset("modern-32-gpu")
    G, D = build_models(cfg.model, 32, 3)
    block = next(m for m in G.modules() if isinstance(m, ModernBlock))
    assert (block.expand.out_channels, block.mix.groups) == (1536, 96)
    assert 20e6 < sum(p.numel() for p in G.parameters()) < 21.5e6


# --- training ------------------------------------------------------------------------------
TINY_DIGITS = [*R3GAN, "model.stage_widths=32,16,8", "model.stage_blocks=1,1,1", "model.group_width=8",
               "model.z_dim=32", "train.batch_size=32", "optim.lr_g=1e-3", "optim.lr_d=1e-3", "optim.beta1=0",
               "optim.beta2=0.9", "train.ema_half_life_kimg=0.5", "eval.num_samples=500",
               "eval.kid_subset_size=100"]  # fmt: skip


def test_a_tiny_conditional_modern_gan_learns_the_digits_and_their_classes(tiny_cfg, digits, tmp_path):
    """200 steps of batch 32 (6.4 kimg): FID of the EMA generator falls to under half its value
    at initialisation and the digit classifier reads the asked class in over a fifth of the
    samples (chance 0.10). Measured at seeds 0, 1, 2 before generated images took their paired
    real image's class: 2,075 -> 623, 2,428 -> 648, 2,376 -> 531; class accuracy 0.31, 0.42,
    0.36. A G that ignores its class fails here (FID 2,311 -> 1,589)."""
    cfg = override(tiny_cfg, [*TINY_DIGITS, "train.total_kimg=6.4", "eval.every_kimg=6.4"])
    assert cfg.model.num_classes == 10
    trainer = Trainer(cfg, LocalSession(str(tmp_path), quiet=True), data=digits)
    before = trainer.evaluator(trainer.nets.G_ema, 10)
    after = trainer.train().history[-1]
    assert after["step"] == 200
    assert after["fid"] < 0.5 * before["fid"], (before["fid"], after["fid"])
    assert after["class_accuracy"] > 0.2 and before["class_accuracy"] < 0.15, (before, after)


def test_relativistic_pairs_share_their_class(tiny_cfg, digits, tmp_path):
    """Each generated image is drawn in the class of the real image it is paired with, in D's
    and in G's phase: a pair then differs in how real it looks, not in what it shows."""
    cfg = override(tiny_cfg, [*TINY_DIGITS, "train.batch_size=16"])
    trainer = Trainer(cfg, LocalSession(str(tmp_path), quiet=True), data=digits)
    loop, asked = trainer.loop, []
    forward = loop.nets.G_train.forward
    loop.nets.G_train.forward = lambda z, labels=None: (asked.append(labels.clone()), forward(z, labels))[1]
    real_batches = []
    real_batch = loop._real_batch
    loop._real_batch = lambda: (lambda batch: (real_batches.append(batch[1].clone()), batch)[1])(real_batch())
    loop.train_step()
    assert len(asked) == 2 and len(real_batches) == 1
    assert torch.equal(asked[0], real_batches[0]) and torch.equal(asked[1], real_batches[0])
    assert len(set(real_batches[0].tolist())) > 1


@pytest.mark.slow  # compiling takes half a minute
def test_compiled_training_takes_the_same_r1_and_r2_as_eager(tiny_cfg, digits, tmp_path):
    """train.compile compiles G and D for the adversarial passes; R1 and R2 differentiate twice
    and go through the eager D. The first step's penalties (same weights, same images) agree."""
    stats = {}
    for compiled in (False, True):
        cfg = override(tiny_cfg, [*TINY_DIGITS, "train.total_kimg=0.032", "train.log_every_steps=1",
                                  "eval.every_kimg=0.032", "eval.num_samples=100", "eval.kid_subset_size=50",
                                  f"train.compile={compiled}"])  # fmt: skip
        trainer = Trainer(cfg, LocalSession(str(tmp_path / str(compiled)), quiet=True), data=digits)
        assert hasattr(trainer.nets.D_train, "_orig_mod") == compiled  # really compiled
        trainer.loop.train_step()
        stats[compiled] = trainer.loop.read_stats()
    for key in ("loss/d/r1", "loss/d/r2", "loss/d", "loss/g"):
        assert stats[True][key] == pytest.approx(stats[False][key], rel=1e-3), key


# --- 128 px end to end -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def discs128(tmp_path_factory) -> str:
    """A labelled RGB dataset at 128 px made here (a disc of one colour per class on grey),
    prepared by the dataset tool, with its evaluator built beside it."""
    from gan.data.prepare import PrepareConfig, prepare
    from gan.evaluation.build import BuildConfig, EvaluatorBuild

    root = tmp_path_factory.mktemp("discs128")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    for name, colour in {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}.items():
        (root / "src" / name).mkdir(parents=True)
        for i in range(24):
            cy, cx, r = rng.integers(40, 88, size=2).tolist() + [int(rng.integers(20, 36))]
            pixels = np.full((128, 128, 3), 128, np.uint8)
            pixels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour
            Image.fromarray(pixels).save(root / "src" / name / f"{i}.png")
    dest = root / "prepared"
    prepare(PrepareConfig(source=str(root / "src"), dest=str(dest), resolution=128, channels=3), log=io.StringIO())
    EvaluatorBuild(BuildConfig(data=str(dest), epochs=1), log=lambda line: None).run()
    return str(dest)


def test_modern_128_trains_scores_samples_and_serves_at_128_px(discs128, tmp_path):
    """The preset (rpgan with R1 and R2 at both steps), the prepared data, the evaluator beside
    it, the sample grid and the served model, all at 128 px."""
    from gan.core.sampling import class_grid, png_bytes
    from gan.evaluation.evaluator import generate_batch
    from gan.registry.models import GENERATOR_FILE, GeneratorModel

    cfg = override(preset("modern-128-cond"), [
        f"data.uri={discs128}", "model.num_classes=3", "loss.r1_every=1", "train.log_every_steps=1",
        "train.batch_size=8", "train.total_kimg=0.016", "eval.every_kimg=0.016", "eval.num_samples=30",
        "eval.kid_subset_size=10"])  # fmt: skip
    trainer = Trainer(cfg, LocalSession(str(tmp_path / "run"), quiet=True))
    assert trainer.evaluator.batch == 125  # G draws a quarter of 64 px's 500 images at once
    assert [generate_batch(side, side) for side in (28, 32, 64)] == [500] * 3
    last = trainer.train().history[-1]
    assert last["step"] == 2 and math.isfinite(last["fid"]) and 0 <= last["class_accuracy"] <= 1
    assert last["loss/d/r2"] > 0 and math.isfinite(last["loss/g"])
    images, columns = class_grid(trainer.nets.G_ema, per_class=2)
    assert images.shape == (6, 128, 128, 3) and png_bytes(images, columns).startswith(b"\x89PNG")

    path = tmp_path / GENERATOR_FILE
    torch.save({"G_ema": trainer.nets.G_ema.state_dict(), "config": cfg.to_json()}, path)
    model = GeneratorModel()
    model.load_context(SimpleNamespace(artifacts={"generator": str(path)}))
    import pandas as pd

    served = model.predict(None, pd.DataFrame([{"n": 3, "seed": 1, "class": 2, "truncation": 0.0}]))
    assert served.shape == (3, 128, 128, 3) and served.dtype == np.uint8
