"""Where runs and sweeps keep their files: a local (or shared) folder or an ``s3://`` URI.

Every path this module hands out is a full URI (``/abs/path`` or ``s3://bucket/key``).
Ray takes a storage path without its scheme plus a pyarrow filesystem for object
stores, and returns checkpoint paths without the scheme: ``ray_args`` and ``full`` convert
on the driver (workers, which hold no Storage, take the scheme from their checkpoint's
filesystem), so callers never add a scheme back by hand.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import getpass
import grp
import json
import os
import pwd
import re
import socket
import stat
import tempfile
import time
import uuid
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


CLAIM_FILE = ".claim"
"""In a run or sweep folder: who started it (JSON). It is created by a write that fails when
the file exists, so of two starts of one name exactly one gets it; locally the process
running the run or sweep also holds a lock on it, so a second --resume is refused."""
CONFLICT_RETRIES = 5
"""AWS answers 409 ConditionalRequestConflict to a conditional write that races another
one: ask again, and the write that lost then finds the claim there."""


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
        overwritten, and a typo in --name is not silently a fresh start. Two identical
        starts both find no folder: the claim file decides between them. Locally, a second
        process is refused a run or sweep in use; a resumed sweep in a local folder must be
        the user's alone (Ray Tune unpickles its state)."""
        folder, marker = self.join(name), self.join(name, CLAIM_FILE)
        exists = self.exists(name)
        if exists and not resume:
            raise taken(folder, what, holder(marker, self.options))
        if resume and not exists:
            raise ValueError(f"nothing to resume: no {what} {name!r} under {self.uri}")
        if resume:
            if what == "sweep" and not self.is_remote:
                check_private(folder)
            if not self.is_remote and marker not in _claims:  # this process may hold it already
                _claims[marker] = _Claim(self, name, _lock(marker, folder, what), new=False)
            return
        if self.is_remote:
            self._create_object(marker, folder, what)
            _claims[marker] = _Claim(self, name, None, new=True)
        else:
            _claims[marker] = _Claim(self, name, _create_file(marker, folder, what), new=True)

    def _create_object(self, marker: str, folder: str, what: str) -> None:
        """``marker`` by a PUT that fails when it exists (If-None-Match: *); ValueError if it does."""
        fs, path = fsspec.core.url_to_fs(marker, **self.options)
        mine = _holder_json()
        for attempt in range(CONFLICT_RETRIES):
            try:
                fs.pipe_file(path, mine, mode="create")
                # A server that checks the condition and writes in two steps (moto does) can let
                # two racing PUTs through: the one whose content stayed is the claim.
                if fs.cat_file(path) != mine:
                    raise FileExistsError(path)
                return
            except FileExistsError:
                raise taken(folder, what, holder(marker, self.options)) from None
            except OSError as err:
                if "ConditionalRequestConflict" not in str(err) or attempt + 1 == CONFLICT_RETRIES:
                    raise ValueError(
                        f"cannot claim {marker} ({err}); the S3 server must support conditional writes (If-None-Match)"
                    ) from None
                time.sleep(1)

    def write(self, uri: str, data: bytes) -> None:
        write_whole(uri, data, self.options)

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


@dataclass(frozen=True)
class _Claim:
    storage: Storage
    name: str
    lock: int | None
    """The open claim file this process holds a lock on (local storage)."""
    new: bool
    """Made by this process: a start that fails before writing anything takes it back."""


_claims: dict[str, _Claim] = {}
"""Claim file -> this process's claim of that run or sweep."""


def release_claims() -> None:
    """End this process's claims: a run or sweep it started that holds nothing but its claim
    file (the start failed before writing anything) is removed, so the same command starts
    it again without --resume; locks are let go. Entry points call it on failure; at exit
    it runs by itself."""
    for marker, claim in list(_claims.items()):
        del _claims[marker]
        with contextlib.suppress(Exception):  # the storage may be unreachable: a claim left is safe
            if claim.new:
                fs, folder = fsspec.core.url_to_fs(claim.storage.join(claim.name), **claim.storage.options)
                if [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False, refresh=True)] == [CLAIM_FILE]:
                    fs.rm(f"{folder}/{CLAIM_FILE}")
                    if not claim.storage.is_remote:
                        os.rmdir(folder)
        if claim.lock is not None:
            os.close(claim.lock)


atexit.register(release_claims)


def taken(folder: str, what: str, by: str) -> ValueError:
    return ValueError(
        f"{folder} already holds a {what}: pass --resume to continue it, or --name"
        + (f" (claimed by {by})" if by else "")
    )


def holder(marker: str, options: dict | None = None) -> str:
    """``user@host, pid N, at T`` from a claim file; empty when there is none (a run from
    before claim files) or it cannot be read."""
    try:
        fs, path = fsspec.core.url_to_fs(marker, **(options or {}))
        by = json.loads(fs.cat_file(path))
        return f"{by['by']}, pid {by['pid']}, at {by['at']}"
    except Exception:
        return ""


def _holder_json() -> bytes:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    by = {"by": f"{user}@{socket.gethostname()}", "pid": os.getpid(), "at": at, "claim": uuid.uuid4().hex}
    return json.dumps(by).encode()


def _create_file(marker: str, folder: str, what: str) -> int:
    """``marker`` created locally and locked, or ValueError if it exists: written whole beside
    its name, then hard-linked to it (a link fails where a rename would replace)."""
    os.makedirs(folder, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=folder, prefix=f"{CLAIM_FILE}.partial-")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)  # before anyone can open it by its name
        os.fchmod(handle, folder_mode() & 0o666)
        os.write(handle, _holder_json())
        os.link(partial, marker)
    except BaseException as err:
        os.close(handle)
        if isinstance(err, FileExistsError):
            raise taken(folder, what, holder(marker)) from None
        raise
    finally:
        os.unlink(partial)
    return handle


def _lock(marker: str, folder: str, what: str) -> int:
    """``marker`` locked for as long as this process lives (or until ``release_claims``),
    with this process written in it; ValueError while another process holds it. A run from
    before claim files gets one now."""
    try:
        handle = os.open(marker, os.O_RDWR | os.O_CREAT, folder_mode() & 0o666)
    except OSError as err:
        raise ValueError(f"cannot lock {marker}: {err.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        by = holder(marker)
        raise ValueError(
            f"{folder} is in use by another process"
            + (f" ({by})" if by else "")
            + f": two processes must not write one {what}; let it end, or stop it, then --resume"
        ) from None
    os.ftruncate(handle, 0)
    os.pwrite(handle, _holder_json(), 0)
    return handle


def check_private(folder: str) -> None:
    """Ray Tune resumes a sweep by unpickling its state, which runs code from the sweep's
    files: refuse a folder holding anything another user owns or may write (group-writable
    is fine for the user's own private group, as umask 002 makes files)."""
    me = os.geteuid()
    for root, dirs, files in os.walk(folder):
        entries = ([root] if root == folder else []) + [os.path.join(root, n) for n in dirs + files]
        for path in entries:
            info = os.lstat(path)
            if info.st_uid != me:
                reason = f"is owned by {_user(info.st_uid)}, not by you ({_user(me)})"
            elif stat.S_ISLNK(info.st_mode):
                continue
            elif info.st_mode & stat.S_IWOTH:
                reason = f"is writable by every user (mode {stat.filemode(info.st_mode)})"
            elif info.st_mode & stat.S_IWGRP and not _own_group(info.st_gid):
                reason = f"is writable by group {_group(info.st_gid)} (mode {stat.filemode(info.st_mode)})"
            else:
                continue
            raise ValueError(
                f"will not resume the sweep in {folder}: {path} {reason}; Ray Tune unpickles a sweep's state "
                "when it resumes, which runs code from its files: resume only a sweep nobody else can write to"
            )


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def _own_group(gid: int) -> bool:
    """A user private group: the user's primary group, named after the user, with nobody else in it."""
    me = _user(os.geteuid())
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return gid == os.getegid() and group.gr_name == me and set(group.gr_mem) <= {me}


def folder_mode() -> int:
    """The mode a new folder gets under the process's umask: what a folder made by
    mkdtemp (0700) is given before it is renamed into place, so others can read it."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


def s3_options(endpoint_url: str | None) -> dict:
    """fsspec options that send s3:// requests to ``endpoint_url`` (none: AWS's)."""
    return {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}


def write_whole(uri: str, data: bytes, options: dict) -> None:
    """``data`` at ``uri`` whole or not at all: a reader (or a resumed sweep) never sees a
    torn file, and a full disk leaves the previous content. One PUT is atomic on S3; a
    local file is written beside its final name and renamed over it."""
    fs, path = fsspec.core.url_to_fs(uri, **options)
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
