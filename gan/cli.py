"""Command-line pieces every entry point shares: presets, --set overrides, --dry-run."""

from __future__ import annotations

import argparse
import sys

from gan.config import Config, ConfigError, describe_presets, override, preset


def add_config_args(parser: argparse.ArgumentParser, default_preset: str = "dcgan") -> None:
    parser.add_argument(
        "--preset", default=default_preset, help=f"starting config (default {default_preset}):\n{describe_presets()}"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set optim.lr_g=1e-4 (repeatable)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    """Preset + --set overrides (+ ``extra`` from dedicated flags), validated."""
    return override(preset(args.preset), list(args.overrides) + list(extra or []))


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None, extra_fn=None):
    """(args, cfg) or exits with one clear line for a bad config."""
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, extra_fn(args) if extra_fn else None)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    if args.dry_run:
        print(cfg.to_json())
        parser.exit(0)
    return args, cfg
