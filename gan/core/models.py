"""Generator and discriminator families. Architecture only: no I/O, optimizers or DDP.

G(z, labels) -> images in [-1, 1], N x C x R x R.   D(x, labels) -> logits, N.
Class-conditional models embed the label into G's input (conditional BN in dcgan's G
instead) and use a projection discriminator (Miyato & Koyama 2018): logit = psi(h) + <embed(y), h>.
D(x, labels, classes=True) -> (logits, <embed(k), h> for every class k: N x classes).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from gan.core.config import MINIBATCH_STD_GROUP, RESOLUTIONS, ModelConfig, stage_sides


def stages(resolution: int) -> tuple[int, int]:
    """(base side, number of 2x stages): 28 -> (7, 2), 32 -> (4, 3), 64 -> (4, 4), 128 -> (4, 5)."""
    k = 2 if resolution % 7 == 0 else int(math.log2(resolution // 4))
    base = resolution >> k
    if base << k != resolution or base < 4:
        raise ValueError(f"resolution {resolution} is not supported; use one of {', '.join(map(str, RESOLUTIONS))}")
    return base, k


def stage_channels(width: int, k: int) -> list[int]:
    """Channels at each stage from the base upwards; the last hidden stage has ``width``."""
    return [width * 2 ** (k - 1 - i) for i in range(k)]


class _Conditioning(nn.Module):
    """Concatenates a learned class embedding to z (identity when unconditional)."""

    def __init__(self, z_dim: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        self.out_dim = z_dim * (2 if num_classes else 1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.embed is None:
            return z
        if labels is None:
            raise ValueError("this generator is class-conditional: pass labels")
        return torch.cat([z, self.embed(labels)], dim=1)


Logits = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""D's logits, or with ``classes=True`` (logits, class scores)."""


class _Projection(nn.Module):
    """Final linear logit plus the projection term for conditional D.

    The projection acts on channel features (spatially summed, as in SNGAN/BigGAN): on
    the whole flattened map it overpowers the linear term and G collapses to one image
    per class."""

    def __init__(self, features: int, num_classes: int, wrap, channels: int | None = None) -> None:
        super().__init__()
        self.linear = wrap(nn.Linear(features, 1))
        self.channels = channels or features
        self.embed = wrap(nn.Embedding(num_classes, self.channels)) if num_classes else None

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None, classes: bool = False) -> Logits:
        out = self.linear(h.flatten(1)).squeeze(1)
        if self.embed is None:
            if classes:
                raise ValueError("an unconditional discriminator has no class scores")
            return out
        if labels is None:
            raise ValueError("this discriminator is class-conditional: pass labels")
        pooled = h.mean(dim=(2, 3)) if h.dim() == 4 else h
        if not classes:
            return out + (self.embed(labels) * pooled).sum(1)
        # The projection term for every class: a classifier sharing D's embedding, so the
        # auxiliary loss adds no parameter and its gradient reaches the same weights.
        # float32 under autocast, as the one-class product above is (the embedding is float32).
        scores = pooled.float() @ self.embed.weight.float().t()
        return out + scores.gather(1, labels.unsqueeze(1)).squeeze(1), scores


class MinibatchStd(nn.Module):
    """Appends the mean std of features over groups of samples (ProGAN/StyleGAN): D sees
    a batch's diversity, so a generator that ignores z is easy to tell from data."""

    def __init__(self, group: int = MINIBATCH_STD_GROUP) -> None:
        super().__init__()
        self.group = group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        g = self.group if n % self.group == 0 else n
        # Groups of consecutive samples: a rank's half of a batch holds whole groups, so
        # 2 workers x b see the same groups as 1 worker x 2b.
        grouped = h.reshape(n // g, g, *h.shape[1:])
        # By hand: torch.var over a non-innermost dim is ~100x slower on CPU (10 ms here).
        var = (grouped - grouped.mean(dim=1, keepdim=True)).square().mean(dim=1)
        std = var.add(1e-8).sqrt().mean(dim=tuple(range(1, h.dim())))
        extra = std.repeat_interleave(g).reshape(n, *([1] * (h.dim() - 1))).expand(n, 1, *h.shape[2:])
        return torch.cat([h, extra], dim=1)


def _wrapper(norm: str):
    return spectral_norm if norm == "spectral" else (lambda m: m)


def _norm2d(norm: str, ch: int) -> nn.Module:
    return nn.BatchNorm2d(ch) if norm == "batch" else nn.Identity()


class Generator(nn.Module):
    """Shared interface: z_dim, num_classes, resolution, channels."""

    z_dim: int
    num_classes: int


# --- mlp (the seed's architecture, working) -------------------------------------------
class MLPGenerator(Generator):
    def __init__(self, cfg: ModelConfig, resolution: int, channels: int) -> None:
        super().__init__()
        self.z_dim, self.num_classes = cfg.z_dim, cfg.num_classes
        self.shape = (channels, resolution, resolution)
        self.cond = _Conditioning(cfg.z_dim, cfg.num_classes)
        layers: list[nn.Module] = []
        dim = self.cond.out_dim
        for i in range(cfg.depth):
            hidden = cfg.width * 2**i
            layers += [nn.Linear(dim, hidden), nn.LeakyReLU(0.2)]
            if cfg.g_norm == "batch":
                layers.append(nn.BatchNorm1d(hidden))
            dim = hidden
        layers += [nn.Linear(dim, math.prod(self.shape)), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self.cond(z, labels)).view(-1, *self.shape)


class MLPDiscriminator(nn.Module):
    def __init__(self, cfg: ModelConfig, resolution: int, channels: int) -> None:
        super().__init__()
        wrap = _wrapper(cfg.d_norm)
        layers: list[nn.Module] = [nn.Flatten()]
        dim = channels * resolution * resolution
        for n_layer, i in enumerate(reversed(range(max(cfg.depth, 1)))):
            if cfg.minibatch_std and n_layer == max(cfg.depth, 1) - 1:
                layers.append(MinibatchStd())
                dim += 1
            hidden = cfg.width * 2**i
            layers += [wrap(nn.Linear(dim, hidden))]
            if cfg.d_norm == "batch":
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.LeakyReLU(0.2))
            dim = hidden
        self.features = nn.Sequential(*layers)
        self.head = _Projection(dim, cfg.num_classes, wrap)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, classes: bool = False) -> Logits:
        return self.head(self.features(x), labels, classes)


# --- dcgan ----------------------------------------------------------------------------
class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose gain and bias come from the class (Dumoulin et al. 2017): the label
    modulates every stage while z alone drives content, which keeps G from ignoring z."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.embed = nn.Embedding(num_classes, 2 * channels)
        with torch.no_grad():
            self.embed.weight[:, :channels].fill_(1.0)
            self.embed.weight[:, channels:].zero_()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gain, bias = self.embed(labels).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return self.bn(x) * gain + bias


class _GStage(nn.Module):
    """conv -> (conditional) norm -> ReLU; the labels reach the norm."""

    def __init__(self, conv: nn.Module, channels: int, norm: str, num_classes: int) -> None:
        super().__init__()
        self.conv = conv
        self.cbn = norm == "batch" and num_classes > 0
        self.norm = ConditionalBatchNorm2d(channels, num_classes) if self.cbn else _norm2d(norm, channels)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = self.conv(x)
        return torch.relu(self.norm(x, labels) if self.cbn else self.norm(x))


class DCGANGenerator(Generator):
    def __init__(self, cfg: ModelConfig, resolution: int, channels: int) -> None:
        super().__init__()
        self.z_dim, self.num_classes = cfg.z_dim, cfg.num_classes
        base, k = stages(resolution)
        chs = stage_channels(cfg.width, k)
        # With batch norm the class enters through conditional BN; without, it is concatenated to z.
        self.cond = _Conditioning(cfg.z_dim, cfg.num_classes if cfg.g_norm == "none" else 0)
        self.base_shape = (chs[0], base, base)
        project = nn.Sequential(
            nn.Linear(self.cond.out_dim, math.prod(self.base_shape)), nn.Unflatten(1, self.base_shape)
        )
        stages_: list[nn.Module] = [_GStage(project, chs[0], cfg.g_norm, cfg.num_classes)]
        for i, ch in enumerate(chs):
            for _ in range(cfg.depth):
                stages_.append(_GStage(nn.Conv2d(ch, ch, 3, 1, 1), ch, cfg.g_norm, cfg.num_classes))
            if i + 1 < k:
                stages_.append(
                    _GStage(nn.ConvTranspose2d(ch, chs[i + 1], 4, 2, 1), chs[i + 1], cfg.g_norm, cfg.num_classes)
                )
        self.stages = nn.ModuleList(stages_)
        self.out = nn.Sequential(nn.ConvTranspose2d(chs[-1], channels, 4, 2, 1), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes and labels is None:
            raise ValueError("this generator is class-conditional: pass labels")
        x = self.cond(z, labels)
        for stage in self.stages:
            x = stage(x, labels)
        return self.out(x)


class DCGANDiscriminator(nn.Module):
    def __init__(self, cfg: ModelConfig, resolution: int, channels: int) -> None:
        super().__init__()
        base, k = stages(resolution)
        chs = stage_channels(cfg.width, k)[::-1]
        wrap = _wrapper(cfg.d_norm)
        layers: list[nn.Module] = []
        in_ch = channels
        for i, ch in enumerate(chs):
            layers.append(wrap(nn.Conv2d(in_ch, ch, 4, 2, 1)))
            if i > 0:  # DCGAN: no norm on the first layer
                layers.append(_norm2d(cfg.d_norm, ch))
            layers.append(nn.LeakyReLU(0.2))
            for _ in range(cfg.depth):
                layers += [wrap(nn.Conv2d(ch, ch, 3, 1, 1)), _norm2d(cfg.d_norm, ch), nn.LeakyReLU(0.2)]
            in_ch = ch
        if cfg.minibatch_std:
            layers += [MinibatchStd(), wrap(nn.Conv2d(in_ch + 1, in_ch, 3, 1, 1)), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.head = _Projection(chs[-1] * base * base, cfg.num_classes, wrap, channels=chs[-1])

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, classes: bool = False) -> Logits:
        return self.head(self.features(x), labels, classes)


# --- resnet ---------------------------------------------------------------------------
class _GBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, norm: str, up: bool) -> None:
        super().__init__()
        self.up = up
        self.n1, self.n2 = _norm2d(norm, in_ch), _norm2d(norm, out_ch)
        self.c1, self.c2 = nn.Conv2d(in_ch, out_ch, 3, 1, 1), nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or up) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.n1(x))
        if self.up:
            h, x = F.interpolate(h, scale_factor=2), F.interpolate(x, scale_factor=2)
        h = self.c2(F.relu(self.n2(self.c1(h))))
        return h + self.skip(x)


class _DBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, wrap, down: bool, first: bool) -> None:
        super().__init__()
        self.down, self.first = down, first
        self.c1, self.c2 = wrap(nn.Conv2d(in_ch, out_ch, 3, 1, 1)), wrap(nn.Conv2d(out_ch, out_ch, 3, 1, 1))
        self.skip = wrap(nn.Conv2d(in_ch, out_ch, 1)) if (in_ch != out_ch or down) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)
        h = self.c2(F.relu(self.c1(h)))
        s = x
        if self.down:
            h = F.avg_pool2d(h, 2)
            # The first block pools before its 1x1 conv: same maths, a quarter of the work.
            s = self.skip(F.avg_pool2d(s, 2)) if self.first else F.avg_pool2d(self.skip(s), 2)
        else:
            s = self.skip(s)
        return h + s


class ResNetGenerator(Generator):
    def __init__(self, cfg: ModelConfig, resolution: int, channels: int) -> None:
        super().__init__()
        self.z_dim, self.num_classes = cfg.z_dim, cfg.num_classes
        base, k = stages(resolution)
        chs = stage_channels(cfg.width, k)
        self.cond = _Conditioning(cfg.z_dim, cfg.num_classes)
        self.base_shape = (chs[0], base, base)
        self.project = nn.Linear(self.cond.out_dim, math.prod(self.base_shape))
        blocks: list[nn.Module] = []
        for i, ch in enumerate(chs):
            out = chs[i + 1] if i + 1 < k else chs[-1]
            blocks.append(_GBlock(ch, out, cfg.g_norm, up=True))
        blocks += [_GBlock(chs[-1], chs[-1], cfg.g_norm, up=False) for _ in range(cfg.depth)]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Sequential(
            _norm2d(cfg.g_norm, chs[-1]), nn.ReLU(), nn.Conv2d(chs[-1], channels, 3, 1, 1), nn.Tanh()
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.project(self.cond(z, labels)).view(-1, *self.base_shape)
        return self.out(self.blocks(h))


class ResNetDiscriminator(nn.Module):
    def __init__(self, cfg: ModelConfig, resolution: int, channels: int) -> None:
        super().__init__()
        _, k = stages(resolution)
        chs = stage_channels(cfg.width, k)[::-1]
        wrap = _wrapper(cfg.d_norm)
        blocks: list[nn.Module] = []
        in_ch = channels
        for i, ch in enumerate(chs):
            blocks.append(_DBlock(in_ch, ch, wrap, down=True, first=i == 0))
            in_ch = ch
        blocks += [_DBlock(in_ch, in_ch, wrap, down=False, first=False) for _ in range(cfg.depth)]
        if cfg.minibatch_std:
            blocks += [MinibatchStd(), wrap(nn.Conv2d(in_ch + 1, in_ch, 3, 1, 1))]
        self.blocks = nn.Sequential(*blocks)
        self.head = _Projection(in_ch, cfg.num_classes, wrap)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, classes: bool = False) -> Logits:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))  # global sum pooling
        return self.head(h, labels, classes)


# --- modern (R3GAN, Huang et al. 2024) -------------------------------------------------
LRELU_GAIN = math.sqrt(2 / (1 + 0.2**2))
"""Gain that keeps the variance of a signal through leaky ReLU (slope 0.2) and a fan-in initialised layer."""
RESAMPLE_FILTER = (1.0, 2.0, 1.0)
"""Low-pass filter of modern up- and down-sampling, per axis (R3GAN's default)."""


class _Conv2dFn(torch.autograd.Function):
    """F.conv2d (stride 1) whose input gradient is a transposed convolution that autograd
    records, as StyleGAN2's conv2d_gradfix: R1 and R2 then differentiate twice through the
    ordinary convolution kernels. torch's own double backward takes a weight gradient as a
    convolution whose kernel is the whole image, once per group: 20 s for one penalty pass
    of a 64-px D on 2 CPU cores."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding: int, groups: int):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.groups, ctx.has_bias = padding, groups, bias is not None
        return F.conv2d(x, weight, bias, padding=padding, groups=groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if torch.is_grad_enabled() and want_x:  # create_graph: this gradient is differentiated again
            grad_x = F.conv_transpose2d(grad, weight, padding=ctx.padding, groups=ctx.groups)
            want_x = False
        if want_x or want_w:
            grad_x_, grad_w = torch.ops.aten.convolution_backward(
                grad,
                x,
                weight,
                None,
                [1, 1],
                [ctx.padding] * 2,
                [1, 1],
                False,
                [0, 0],
                ctx.groups,
                [want_x, want_w, False],
            )[:2]
            grad_x = grad_x if grad_x is not None else grad_x_
        if ctx.has_bias and want_b:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d (stride 1, 'same' padding) through ``_Conv2dFn``: fast to differentiate twice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Conv2dFn.apply(x, self.weight, self.bias, self.padding[0], self.groups)


def msr_init(layer: nn.Conv2d | nn.Linear, gain: float = 1.0) -> nn.Module:
    """Weights ~ N(0, gain^2 / fan_in), bias 0 (He et al. 2015; R3GAN's MSR initialisation)."""
    fan_in = layer.weight[0].numel()
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(fan_in))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def resample_kernel(filter_: tuple[float, ...] = RESAMPLE_FILTER) -> torch.Tensor:
    """The 2-D kernel of a 2x resampling with ``filter_``: the filter convolved with the 2-tap
    box of nearest-neighbour up-sampling (or 2x2 average pooling), outer product, sum 1.
    [1,2,1] -> [1,3,3,1] x [1,3,3,1] / 64."""
    taps = torch.tensor(filter_, dtype=torch.float64)
    taps = F.conv1d(F.pad(taps.view(1, 1, -1), (1, 1)), torch.ones(1, 1, 2, dtype=torch.float64)).flatten()
    kernel = taps[:, None] * taps[None, :]
    return (kernel / kernel.sum()).float()


class Resample(nn.Module):
    """2x up- or down-sampling through the low-pass filter, per channel: nearest-neighbour
    up-sampling then the [1,2,1] blur, or the blur then 2x2 average pooling, each as one
    stride-2 4x4 filter. Zero padding at the border, as R3GAN's upfirdn2d."""

    def __init__(self, up: bool) -> None:
        super().__init__()
        self.up = up
        self.register_buffer("kernel", resample_kernel().view(1, 1, 4, 4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Depthwise: the fixed kernel takes no gradient, so differentiating twice (R1, R2) adds
        # no per-channel weight gradients, and this is the fastest form on a CPU.
        c = x.shape[1]
        kernel = self.kernel.to(x.dtype).expand(c, 1, 4, 4)
        if self.up:  # x4: the kernel's sum of 1 spread over the four outputs of each input
            return F.conv_transpose2d(x, kernel * 4, stride=2, padding=1, groups=c)
        return F.conv2d(x, kernel, stride=2, padding=1, groups=c)


class ModernBlock(nn.Module):
    """x + conv1x1(lrelu(grouped conv3x3(lrelu(conv1x1(x))))): expand, mix in groups, project
    back. Fix-up initialisation: the last layer starts at zero, so the block starts as the
    identity, and the others' gains shrink with the network's number of blocks (R3GAN)."""

    def __init__(self, channels: int, expansion: int, group_width: int, num_blocks: int) -> None:
        super().__init__()
        inner = channels * expansion
        # Variance scaling for a residual branch of 3 layers: gain * L^(-1/(2*3 - 2)).
        gain = LRELU_GAIN * num_blocks ** (-1 / 4)
        self.expand = msr_init(Conv2d(channels, inner, 1), gain)
        self.mix = msr_init(Conv2d(inner, inner, 3, padding=1, groups=inner // group_width), gain)
        self.project = Conv2d(inner, channels, 1, bias=False)
        nn.init.zeros_(self.project.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.expand(x), 0.2)
        h = F.leaky_relu(self.mix(h), 0.2)
        return x + self.project(h)


def _transition(in_ch: int, out_ch: int) -> nn.Module:
    """The 1x1 convolution between stages of different widths (identity when equal)."""
    return msr_init(Conv2d(in_ch, out_ch, 1, bias=False)) if in_ch != out_ch else nn.Identity()


class ModernGenerator(Generator):
    """A learned base_side^2 input per channel, scaled by a linear map of (z, class
    embedding); then per stage: a 1x1 to the stage's width, 2x up-sampling, residual blocks;
    a 1x1 to the image's channels and tanh. At initialisation every block is the identity,
    so G is linear in (z, embedding) up to the tanh."""

    def __init__(self, cfg: ModelConfig, resolution: int, channels: int) -> None:
        super().__init__()
        self.z_dim, self.num_classes = cfg.z_dim, cfg.num_classes
        stages_ = cfg.modern_stages(resolution)
        base = stage_sides(resolution)[0]
        total = sum(blocks for _, blocks in stages_)
        self.cond = _Conditioning(cfg.z_dim, cfg.num_classes)
        self.basis = nn.Parameter(torch.randn(stages_[0][0], base, base))
        self.scale = msr_init(nn.Linear(self.cond.out_dim, stages_[0][0], bias=False))
        layers: list[nn.Module] = []
        for i, (width, blocks) in enumerate(stages_):
            stage = [] if i == 0 else [_transition(stages_[i - 1][0], width), Resample(up=True)]
            stage += [ModernBlock(width, cfg.expansion, cfg.group_width, total) for _ in range(blocks)]
            layers.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*layers)
        self.out = msr_init(Conv2d(stages_[-1][0], channels, 1))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.basis * self.scale(self.cond(z, labels))[:, :, None, None]
        return torch.tanh(self.out(self.stages(h)))


class ModernDiscriminator(nn.Module):
    """G mirrored: a 1x1 from the image's channels; per stage: residual blocks, 2x
    down-sampling, a 1x1 to the next width; at base_side, a learned base_side^2 filter per
    channel and the projection head. At initialisation D is linear in its input."""

    def __init__(self, cfg: ModelConfig, resolution: int, channels: int) -> None:
        super().__init__()
        stages_ = cfg.modern_stages(resolution)[::-1]
        base = stage_sides(resolution)[0]
        total = sum(blocks for _, blocks in stages_)
        self.extract = msr_init(Conv2d(channels, stages_[0][0], 1, bias=False))
        layers: list[nn.Module] = []
        for i, (width, blocks) in enumerate(stages_):
            stage: list[nn.Module] = [ModernBlock(width, cfg.expansion, cfg.group_width, total) for _ in range(blocks)]
            if i + 1 < len(stages_):
                stage += [Resample(up=False), _transition(width, stages_[i + 1][0])]
            layers.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*layers)
        width = stages_[-1][0]
        # A learned base x base filter per channel, summed: a depthwise convolution without
        # padding, as a product (which differentiates twice without a loop over channels).
        self.basis = nn.Parameter(torch.randn(width, base, base) / base)
        self.head = _Projection(width, cfg.num_classes, lambda m: m)
        msr_init(self.head.linear)
        if self.head.embed is not None:  # the class term starts at the scale of the linear one
            nn.init.normal_(self.head.embed.weight, 0.0, 1 / math.sqrt(width))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, classes: bool = False) -> Logits:
        h = (self.stages(self.extract(x)) * self.basis).sum((2, 3))
        return self.head(h, labels, classes)


FAMILIES = {
    "mlp": (MLPGenerator, MLPDiscriminator),
    "dcgan": (DCGANGenerator, DCGANDiscriminator),
    "resnet": (ResNetGenerator, ResNetDiscriminator),
    "modern": (ModernGenerator, ModernDiscriminator),
}


def build_models(cfg: ModelConfig, resolution: int, channels: int) -> tuple[Generator, nn.Module]:
    """G and D for ``cfg`` at ``resolution`` x ``resolution`` with ``channels`` channels."""
    g_cls, d_cls = FAMILIES[cfg.family]
    return g_cls(cfg, resolution, channels), d_cls(cfg, resolution, channels)
