"""Where runs and sweeps keep their files: a local (or shared) folder or an ``s3://`` URI.

Every path this module hands out is a full URI (``/abs/path`` or ``s3://bucket/key``).
Ray takes a storage path without its scheme plus a pyarrow filesystem for object
stores, and returns checkpoint paths without the scheme: ``ray_args`` and ``full`` convert
on the driver (workers, which hold no Storage, take the scheme from their checkpoint's
filesystem), so callers never add a scheme back by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass

import fsspec

SCHEMES = ("s3",)
"""Object stores a run can use; anything else with ``://`` is refused, never a local folder."""
RAY_RETRIES = {"mode": "standard", "max_attempts": 10}
"""botocore retries for the filesystem Ray writes through. Ray Train's controller ends the
run when one write of its checkpoint snapshot fails, so a storage outage of up to about a
minute (jittered backoff, doubling from 1 s to 20 s) is waited out instead; the checks
before a run keep botocore's short default, so a wrong endpoint fails in seconds. A user's
own AWS_MAX_ATTEMPTS or AWS_RETRY_MODE replaces it."""
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for a submitted entrypoint: its runtime env, as JSON."""


URI_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(?!//)")
"""``s3:/bucket`` or ``s3:bucket``: meant as a URI, but without ``://`` it would be a local
folder named ``s3:`` in the working directory."""


def check_uri_form(uri: str, what: str, error: type[Exception]) -> None:
    """``error`` naming ``uri`` when it starts like a URI but is not a well-formed one."""
    if match := URI_LIKE.match(uri):
        scheme = match.group(1)
        raise error(
            f"{what}{uri}: starts like a URI but is not one; write {scheme}://{uri[len(scheme) + 1 :].lstrip('/')} "
            f"(or ./{uri} for a local folder of that name)"
        )


def url_to_fs(uri: str, options: dict, error: type[Exception]) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem and path for ``uri``; a malformed URI, an unknown scheme or a
    backend that is not installed becomes ``error`` naming the URI."""
    check_uri_form(uri, "", error)
    try:
        return fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as err:
        raise error(f"{uri}: cannot open this URI ({err})") from None


def check_outlives_job(path: str, what: str, instead: str) -> None:
    """Under `ray job submit --working-dir`, the entrypoint runs in Ray's temporary copy
    of that folder, deleted when the job ends: nothing a user keeps may be written there."""
    try:
        runtime_env = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return
    copy = os.getcwd()
    if runtime_env.get("working_dir") and os.path.commonpath([os.path.abspath(path), copy]) == copy:
        raise ValueError(
            f"{what} is inside Ray's temporary copy of --working-dir ({copy}), deleted when the job ends; {instead}"
        )


@dataclass(frozen=True)
class Storage:
    uri: str
    """Root of runs and sweeps: an absolute folder or ``s3://bucket/prefix``."""
    endpoint_url: str | None = None
    """S3 API endpoint (MinIO, an S3 server on loopback); None for AWS itself."""
    shared: bool = False
    """A local path that every node of the cluster mounts (NFS, a shared volume)."""

    @classmethod
    def parse(cls, uri: str, endpoint_url: str | None = None, shared: bool = False) -> Storage:
        """Validate the form of ``uri`` without touching it; ValueError names what to pass."""
        if not uri:
            raise ValueError("--storage is empty: pass a folder or s3://bucket/prefix")
        check_uri_form(uri, "--storage ", ValueError)
        scheme, sep, rest = uri.partition("://")
        if sep:
            if scheme not in SCHEMES:
                hint = f" (schemes are lower case: {scheme.lower()}://)" if scheme.lower() in SCHEMES else ""
                raise ValueError(f"--storage {uri}: unsupported scheme {scheme}://{hint}; use s3:// or a folder")
            if not rest.split("/", 1)[0]:
                raise ValueError(f"--storage {uri}: no bucket name")
            return cls(uri.rstrip("/"), endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
        check_outlives_job(uri, f"--storage {uri}", 'pass an absolute folder (--storage "$PWD/runs") or s3://...')
        return cls(os.path.abspath(uri), None, shared)

    @classmethod
    def open(cls, uri: str, endpoint_url: str | None = None, shared: bool = False) -> Storage:
        """Parse, then check it can be used (the bucket exists, the folder can be created)."""
        storage = cls.parse(uri, endpoint_url, shared)
        storage.check()
        return storage

    @property
    def is_remote(self) -> bool:
        return "://" in self.uri

    @property
    def options(self) -> dict:
        """fsspec options (the S3 endpoint, if any)."""
        return s3_options(self.endpoint_url)

    def filesystem(self, **options) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.uri, **self.options, **options)[0]

    def join(self, *parts: str) -> str:
        return "/".join([self.uri, *(p.strip("/") for p in parts)])

    def exists(self, *parts: str) -> bool:
        """Whether a run or sweep folder is there (what --resume continues)."""
        return self.filesystem().exists(self.join(*parts))

    def claim(self, name: str, resume: bool, what: str = "run") -> None:
        """A new ``name`` must not exist and a resumed one must: nothing the user has is
        overwritten, and a typo in --name is not silently a fresh start."""
        exists = self.exists(name)
        if exists and not resume:
            raise ValueError(f"{self.join(name)} already holds a {what}: pass --resume to continue it, or --name")
        if resume and not exists:
            raise ValueError(f"nothing to resume: no {what} {name!r} under {self.uri}")

    def write(self, uri: str, data: bytes) -> None:
        """``data`` at ``uri`` whole or not at all: a reader (or a resumed sweep) never sees a
        torn file, and a full disk leaves the previous content. One PUT is atomic on S3; a
        local file is written beside its final name and renamed over it."""
        fs, path = fsspec.core.url_to_fs(uri, **self.options)
        folder = path.rsplit("/", 1)[0]
        fs.makedirs(folder, exist_ok=True)
        if "://" in uri:
            fs.pipe_file(path, data)
            return
        handle, partial = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.partial-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(partial, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise

    def ray_args(self, *parts: str):
        """(storage_path, storage_filesystem) as Ray Train and Tune take them."""
        if not self.is_remote:
            return self.join(*parts), None
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        user_set = os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")
        filesystem = self.filesystem(**({} if user_set else {"config_kwargs": {"retries": RAY_RETRIES}}))
        return self.join(*parts).split("://", 1)[1], PyFileSystem(FSSpecHandler(filesystem))

    def full(self, ray_path: str) -> str:
        """A path Ray returned (schemeless for object stores) as a full URI."""
        if not self.is_remote or "://" in ray_path:
            return ray_path
        return f"{self.uri.split('://', 1)[0]}://{ray_path.lstrip('/')}"

    def check_cluster(self, nodes: int) -> None:
        """Ray Train needs storage every node reads: a node-local folder on a cluster of
        several nodes fails only after training, when Ray gathers the checkpoints."""
        if nodes > 1 and not self.is_remote and not self.shared:
            raise ValueError(
                f"--storage {self.uri} is a local folder, but the Ray cluster has {nodes} nodes that cannot read "
                "each other's disks: pass --storage s3://bucket/prefix, or --shared-storage if every node mounts it"
            )

    def check(self) -> None:
        """Fail before any worker starts, naming the bucket or folder."""
        if not self.is_remote:
            try:
                os.makedirs(self.uri, exist_ok=True)
            except OSError as err:
                raise ValueError(f"cannot create storage folder {self.uri}: {err.strerror}") from None
            return
        import botocore.exceptions

        bucket = self.uri.split("://", 1)[1].split("/", 1)[0]
        where = f"s3://{bucket}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        try:
            self.filesystem().ls(bucket, refresh=True)
        except FileNotFoundError:
            raise ValueError(f"bucket {where} does not exist; create it or fix the --storage URI") from None
        except PermissionError as err:
            raise ValueError(f"no access to {where} (check AWS credentials): {err}") from None
        except (OSError, botocore.exceptions.BotoCoreError) as err:
            raise ValueError(f"cannot reach {where}: {type(err).__name__}: {err}") from None


def folder_mode() -> int:
    """The mode a new folder gets under the process's umask: what a folder made by
    mkdtemp (0700) is given before it is renamed into place, so others can read it."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


def s3_options(endpoint_url: str | None) -> dict:
    """fsspec options that send s3:// requests to ``endpoint_url`` (none: AWS's)."""
    return {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}
