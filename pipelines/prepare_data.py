"""Prepare a dataset once: uint8 shards at one resolution, labels and a sha256 manifest.

Training then reads it by URI (--set data.uri=DEST) with its manifest's sha256 as the
dataset fingerprint; a remote one is fetched once per node into a local cache. Training
given the raw source itself prepares it with this same code into that cache (one process
per node, one worker): the same pixels and fingerprint, but a large set of photos is
faster prepared here once, with --workers.

    python pipelines/prepare_data.py photos/ prepared/photos64 --resolution 64 --workers 8
    python pipelines/prepare_data.py photos.zip s3://bucket/data/photos64 --labels labels.csv
    python pipelines/prepare_data.py s3://bucket/raw/icons.tar.gz icons32 --resolution 32 --background black
    python pipelines/prepare_data.py train-images-idx3-ubyte.gz mnist28 --resolution 28 --channels 1 \\
        --labels train-labels-idx1-ubyte.gz
    python pipelines/prepare_data.py fashion.npz fashion32 --resolution 32 --channels 1

Labels: one sub-folder per class (folders and archives), a CSV of path,label rows
(--labels), an IDX labels file for IDX images, or the .npz's 'labels' key. Skipped files
are named on stderr and counted at the end; nothing is written under DEST unless the
whole dataset is.

Only regular files are opened: FIFOs, devices, sockets and links to them are skipped by
name, and so are links out of a source folder unless --follow-links. Reads are bounded:
--max-file-mib per file or archive member (skipped unread when over), --max-archive-mib
for what one archive expands to and --max-array-mib for an .npz array or IDX file (both
refused when over, from their headers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gan.cli import fail
from gan.core.config import RESOLUTIONS
from gan.data.prepare import PrepareConfig, prepare
from gan.data.sources import MAX_ARCHIVE_BYTES, MAX_ARRAY_BYTES, MAX_MEMBER_BYTES
from gan.data.storage import s3_options

MIB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder, .zip, .tar[.gz|.bz2|.xz], MNIST IDX[.gz] or .npz; path or URI")
    parser.add_argument("dest", help="new folder or s3:// prefix for the prepared dataset")
    parser.add_argument("--labels", default="", help="CSV of path,label (folders, archives) or IDX labels file")
    parser.add_argument("--no-labels", action="store_true", help="ignore sub-folders and .npz labels: unlabelled")
    parser.add_argument("--resolution", type=int, default=64, choices=RESOLUTIONS, help="side in pixels (default 64)")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3), help="1 gray or 3 RGB (default 3)")
    parser.add_argument("--background", default="white", help="colour under transparent pixels (default white)")
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard (default 4096)")
    parser.add_argument("--overwrite", action="store_true", help="replace a prepared dataset already at DEST")
    parser.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="S3 API endpoint URL for s3:// URIs (default $AWS_ENDPOINT_URL or AWS)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="processes decoding images (default 1)")
    parser.add_argument("--progress-every-s", type=float, default=5.0, help="seconds between progress lines")
    limits = parser.add_argument_group("limits on untrusted input")
    limits.add_argument("--follow-links", action="store_true", help="read symbolic links out of a source folder")
    limits.add_argument("--max-file-mib", type=float, default=MAX_MEMBER_BYTES / MIB,
                        help="larger files and archive members are skipped unread (default %(default)g)")  # fmt: skip
    limits.add_argument("--max-archive-mib", type=float, default=MAX_ARCHIVE_BYTES / MIB,
                        help="most one archive may expand to, all members together (default %(default)g)")  # fmt: skip
    limits.add_argument("--max-array-mib", type=float, default=MAX_ARRAY_BYTES / MIB,
                        help="largest .npz array or IDX file, held whole in memory (default %(default)g)")  # fmt: skip
    args = parser.parse_args(argv)

    options = s3_options(args.s3_endpoint)
    try:
        cfg = PrepareConfig(
            source=args.source,
            dest=args.dest,
            labels=args.labels,
            infer_labels=not args.no_labels,
            resolution=args.resolution,
            channels=args.channels,
            background=args.background,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            storage_options=json.dumps(options) if options else "",
            progress_every_s=args.progress_every_s,
            workers=args.workers,
            follow_links=args.follow_links,
            max_member_bytes=int(args.max_file_mib * MIB),
            max_archive_bytes=int(args.max_archive_mib * MIB),
            max_array_bytes=int(args.max_array_mib * MIB),
        )
        manifest = prepare(cfg)
    except ValueError as err:  # PrepareError and the sources' DataError, each naming its input
        return fail(str(err))
    except KeyboardInterrupt:
        return fail(f"interrupted: no dataset was published at {args.dest}", code=130)
    classes = manifest["class_names"]
    labelled = f"{len(classes)} classes ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
    print(
        f"wrote {args.dest}: {manifest['count']} images of {'x'.join(map(str, manifest['shape']))}, "
        f"{labelled if classes else 'unlabelled'}, {len(manifest['shards'])} shards, "
        f"{manifest['skipped']} skipped, sha256 {manifest['sha256']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
