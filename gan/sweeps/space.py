"""The search-space language: what a sweep varies, parsed and checked before any trial.

A space maps ``SECTION.FIELD`` to a constant or ``{kind: [args]}`` (YAML/JSON files,
``--space`` flags). Pure: no Ray, no torch; the Ray Tune adapter (gan/sweeps/ray_tune.py) turns
dimensions into Tune domains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gan.core.config import MUTABLE, Config, ConfigError, override

# Kinds of dimension and how many values each takes (None: one or more). A grid runs
# every value for each of --trials samples of the rest of the space.
KINDS = {"choice": None, "grid": None, "loguniform": 2, "uniform": 2, "randint": 2}

# The default GPU space: both learning rates, Adam's betas, the loss, the architecture,
# EMA and augmentation on/off.
GPU_SPACE: dict[str, Any] = {
    "optim.lr_g": {"loguniform": [1e-4, 2e-3]},
    "optim.lr_d": {"loguniform": [1e-4, 2e-3]},
    "optim.beta1": {"choice": [0.0, 0.5]},
    "optim.beta2": {"choice": [0.9, 0.99, 0.999]},
    "loss.kind": {"choice": ["ns", "hinge"]},
    "model.family": {"choice": ["dcgan", "resnet"]},
    "model.width": {"choice": [32, 64, 128]},
    "model.depth": {"choice": [0, 1]},
    "train.ema_half_life_kimg": {"choice": [0.0, 1.0]},
    "loss.augment": {"choice": ["", "translation"]},
}
# On one CPU thread a ResNet G/D trains at about 50 img/s (DCGAN 200 to 600) and width 128
# is no better: the local space keeps DCGAN at widths 32/64 so a sweep fits in minutes.
CPU_SPACE: dict[str, Any] = {**GPU_SPACE, "model.family": "dcgan", "model.width": {"choice": [32, 64]}}


@dataclass(frozen=True)
class Dimension:
    """One searched config field: a constant, a choice, or a range."""

    key: str
    kind: str  # "constant" or one of KINDS
    values: tuple

    def extremes(self) -> tuple:
        """Values that must all build a valid config (both ends of a range, every choice)."""
        return self.values

    def describe(self) -> str:
        if self.kind == "constant":
            return repr(self.values[0])
        if self.kind in ("choice", "grid"):
            return self.kind + "{" + ", ".join(map(repr, self.values)) + "}"
        return f"{self.kind}[{self.values[0]:g}, {self.values[1]:g}]"


def dimension(key: str, spec: Any) -> Dimension:
    """From a YAML/JSON entry: a plain value, or ``{kind: [args]}``."""
    if not isinstance(spec, dict):
        return Dimension(key, "constant", (spec,))
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"space {key}: write a value or one of {{{', '.join(KINDS)}: [...]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    args = tuple(args) if isinstance(args, list | tuple) else (args,)
    if not args or (KINDS[kind] and len(args) != KINDS[kind]):
        raise ConfigError(f"space {key}: {kind} takes {KINDS[kind] or 'one or more'} values, got {list(args)}")
    if KINDS[kind]:  # YAML reads 1e-5 (no dot) as a string
        try:
            args = tuple(int(a) if kind == "randint" else float(a) for a in args)
        except (TypeError, ValueError):
            raise ConfigError(f"space {key}: {kind} takes numbers, got {list(args)}") from None
    if KINDS[kind] and not args[0] < args[1]:
        raise ConfigError(f"space {key}: {kind} needs low < high, got {list(args)}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"space {key}: loguniform needs a positive low end, got {args[0]}")
    return Dimension(key, kind, args)


def _scalar(text: str) -> Any:
    """A command-line value: int, float (1e-5 too), bool, or the string itself."""
    import yaml

    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return yaml.safe_load(text) if text else ""


def parse_override(text: str) -> tuple[str, Any]:
    """``--space KEY=VALUE`` or ``KEY=KIND:ARGS``: ``optim.lr_g=loguniform:1e-5:1e-3``,
    ``model.width=choice:32,64``, ``model.depth=1``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--space {text!r}: write SECTION.FIELD=VALUE or SECTION.FIELD=KIND:ARGS")
    kind, colon, args = value.partition(":")
    if colon and kind in KINDS:
        separator = "," if kind in ("choice", "grid") else ":"
        return key.strip(), {kind: [_scalar(a) for a in args.split(separator)]}
    return key.strip(), _scalar(value)


def load_space_file(uri: str) -> dict[str, Any]:
    import fsspec
    import yaml

    try:
        with fsspec.open(uri, "r") as handle:
            spec = yaml.safe_load(handle)  # YAML is a superset of JSON
    except FileNotFoundError:
        raise ConfigError(f"search space file {uri} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"search space file {uri} is not valid YAML/JSON: {err}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"search space file {uri} must map SECTION.FIELD to a value or {{kind: [...]}}")
    return spec


def build_space(base: Config, spec: dict[str, Any]) -> dict[str, Dimension]:
    """Parse and validate every dimension against the config before any trial starts."""
    space = {key: dimension(key, value) for key, value in spec.items()}
    for dim in space.values():
        for value in dim.extremes():
            try:
                override(base, [f"{dim.key}={as_override(value)}"])
            except ConfigError as err:
                raise ConfigError(f"search space {dim.key}={dim.describe()}: {err}") from None
    return space


def as_override(value: Any) -> str:
    return "" if value is None else str(value)


def space_as_dict(space: dict[str, Dimension]) -> dict[str, Any]:
    return {k: (d.values[0] if d.kind == "constant" else {d.kind: list(d.values)}) for k, d in space.items()}


def searched(space: dict[str, Dimension]) -> tuple[str, ...]:
    """The fields a sweep varies (what tables and labels show of a trial)."""
    return tuple(k for k, dim in space.items() if dim.kind != "constant")


def check_mutable(space: dict[str, Dimension]) -> None:
    """PBT continues weak trials from strong ones' weights: only settings a running trial
    can change may differ between trials."""
    fixed = [key for key in searched(space) if key not in MUTABLE]
    if fixed:
        raise ConfigError(
            f"--scheduler pbt copies weights between trials, so it can search only {', '.join(MUTABLE)}; "
            f"the space varies {', '.join(fixed)}: fix it (--space {fixed[0]}=VALUE) or use --scheduler asha"
        )


def mutable_only(spec: dict[str, Any]) -> dict[str, Any]:
    """A space spec without the dimensions PBT cannot perturb (the base config sets them)."""
    return {key: value for key, value in spec.items() if key in MUTABLE}


# PBT's explore step, as in the PBT paper and Ray's scheduler: usually a nudge of the
# donor's value, sometimes a fresh draw.
RESAMPLE_PROBABILITY = 0.25
PERTURB_FACTORS = (0.8, 1.2)


def perturb(params: dict[str, Any], space: dict[str, Dimension], rng) -> dict[str, Any]:
    """``params`` with every searched dimension explored: a range scaled by 0.8 or 1.2 and
    kept inside it, a choice moved to a neighbour, or (1 in 4) drawn afresh. ``rng`` is a
    ``random.Random``."""
    out = dict(params)
    for key in searched(space):
        dim, value = space[key], params[key]
        if rng.random() < RESAMPLE_PROBABILITY:
            out[key] = draw(dim, rng)
        elif dim.kind in ("choice", "grid"):
            index = dim.values.index(value) if value in dim.values else 0
            out[key] = dim.values[min(max(index + rng.choice((-1, 1)), 0), len(dim.values) - 1)]
        else:
            low, high = dim.values
            scaled = min(max(value * rng.choice(PERTURB_FACTORS), low), high)
            out[key] = round(scaled) if dim.kind == "randint" else scaled
    return out


def draw(dim: Dimension, rng) -> Any:
    """One value of ``dim``, as Tune's domain of it would draw."""
    if dim.kind in ("choice", "grid"):
        return rng.choice(dim.values)
    low, high = dim.values
    if dim.kind == "randint":
        return rng.randint(low, high)
    if dim.kind == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def describe(space: dict[str, Dimension]) -> str:
    return "\n".join(f"  {key} = {dim.describe()}" for key, dim in space.items())


def default(gpu: bool) -> dict[str, Any]:
    """A fresh copy of the default space for GPU or CPU workers."""
    return dict(GPU_SPACE if gpu else CPU_SPACE)
