"""Fetch and prepare the emoji benchmark set: 3,786 RGBA 64-px emoji of one vendor from the
npm registry's `emoji-datasource-<vendor>` package, labelled with their emoji.json category
(10 classes), composited on white, prepared at 64 px (or 32: --resolution 32), with an
evaluator built for it.

The images are not committed: this script fetches them (as an install step would) with
`npm pack` into --cache, and is run by `benchmarks/run.py --only emoji`. Usage:
    python benchmarks/emoji_data.py --cache ~/.cache/gan-bench          # prints the prepared folder
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENDOR, VERSION = "twitter", "16.0.0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "gan-bench"))
    parser.add_argument("--vendor", default=VENDOR, help=f"apple, google, twitter or facebook (default {VENDOR})")
    parser.add_argument("--resolution", type=int, default=64, choices=(32, 64), help="pixels (default 64)")
    args = parser.parse_args()
    print(prepare(Path(args.cache), args.vendor, args.resolution))
    return 0


def prepare(cache: Path, vendor: str = VENDOR, resolution: int = 64) -> str:
    """The prepared dataset's folder, with its evaluator.pt; reuses what is there."""
    cache.mkdir(parents=True, exist_ok=True)
    package = f"emoji-datasource-{vendor}"
    archive = cache / f"{package}-{VERSION}.tgz"
    if not archive.exists():
        subprocess.run(["npm", "pack", f"{package}@{VERSION}", "--pack-destination", str(cache)], check=True)
    labels = cache / f"{package}-{VERSION}.labels.csv"
    if not labels.exists():
        write_labels(archive, vendor, labels)
    dest = cache / f"emoji-{vendor}-{resolution}"
    if not (dest / "manifest.json").exists():
        run("pipelines/prepare_data.py", str(archive), str(dest), "--labels", str(labels),
            "--resolution", str(resolution), "--background", "white", "--workers", "2")  # fmt: skip
    if not (dest / "evaluator.pt").exists():
        run("pipelines/build_evaluator.py", "--data", str(dest))
    return str(dest)


def write_labels(archive: Path, vendor: str, dest: Path) -> None:
    """path,label rows for every 64-px image of the vendor: the emoji's category; skin-tone
    variants share their emoji's category."""
    with tarfile.open(archive) as tar:
        emoji = json.load(tar.extractfile("package/emoji.json"))
    rows = []
    for entry in emoji:
        for variant in [entry, *entry.get("skin_variations", {}).values()]:
            if variant.get(f"has_img_{vendor}"):
                rows.append((f"package/img/{vendor}/64/{variant['image']}", entry["category"]))
    with open(dest, "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / script), *args], check=True, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
