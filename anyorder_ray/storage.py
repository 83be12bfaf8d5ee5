"""Where a run's files live: a local folder or any ``pyarrow.fs`` URI (``s3://``, ``gs://``, ``file://``, ``hdfs://``).

``Location`` names one file or folder on one filesystem. It is what the sweep passes to Ray Tune and Ray Train
(``storage_filesystem`` + a path without the scheme), what the trial's metrics log and trajectory buffer write
to, and what the results tables are uploaded to. Options of the filesystem travel in the URI's query, as
``pyarrow.fs.FileSystem.from_uri`` reads them, e.g. a local S3 API::

    s3://runs/sweeps?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1

Credentials come from the filesystem's usual chain (for S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, an instance role). ``Location`` is a plain picklable value: it crosses process boundaries to
actors and train workers, which talk to the storage themselves.

``check_writable`` runs before a sweep creates anything: a misspelt bucket, an unreachable endpoint, missing
credentials or a read-only location stop the sweep with a message naming the URI and the fix.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

__all__ = ["Location", "StorageError", "as_location", "check_writable", "default_job_root", "in_ray_job"]


class StorageError(RuntimeError):
    """A storage location that cannot be used, with the URI and what to do about it."""


@dataclass(frozen=True)
class Location:
    """A file or folder: ``scheme`` ("" for a local path), ``path`` inside the filesystem, ``query`` (the URI's
    filesystem options). The filesystem itself is built on demand (``fs``) and cached per process."""

    scheme: str
    path: str
    query: str = ""

    @classmethod
    def parse(cls, where: str | os.PathLike) -> Location:
        """A local path (made absolute) or a URI with a scheme."""
        text = os.fspath(where)
        if "://" not in text:
            return cls("", str(Path(text).expanduser().resolve()))
        scheme, rest = text.split("://", 1)
        rest, _, query = rest.partition("?")
        if scheme == "file":
            return cls("", str(Path(rest or "/").resolve()))
        if not rest.strip("/"):
            raise StorageError(f"storage URI {text!r} names no bucket or path (e.g. {scheme}://my-bucket/runs)")
        return cls(scheme.lower(), rest.rstrip("/"), query)

    # -- naming ----------------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return self.scheme == ""

    @property
    def uri(self) -> str:
        """The location as a user writes it (a path when local). Its query holds filesystem options only: pyarrow
        takes no credentials in a URI."""
        if self.is_local:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def child(self, *parts: str) -> Location:
        return Location(self.scheme, posixpath.join(self.path, *parts), self.query)

    @property
    def parent(self) -> Location:
        return Location(self.scheme, posixpath.dirname(self.path), self.query)

    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.path)

    # -- the filesystem ----------------------------------------------------------------------------------
    @property
    def fs(self) -> pafs.FileSystem:
        return _filesystem(self.scheme, self.path.split("/", 1)[0], self.query)

    def ray_storage(self) -> tuple[str, pafs.FileSystem | None]:
        """``(storage_path, storage_filesystem)`` for Ray Tune / Ray Train's ``RunConfig``."""
        return (self.path, None) if self.is_local else (self.path, self.fs)

    # -- files -----------------------------------------------------------------------------------------
    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def list(self) -> list[Location]:
        """The files and folders directly inside this folder, by name (empty when it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((Location(self.scheme, i.path, self.query) for i in infos), key=lambda loc: loc.path)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file so a reader sees the old content or the new, never a part: locally through a
        temporary file renamed into place; object stores make a completed upload visible at once."""
        if self.is_local:
            from anyorder_ray.fileio import atomic_write

            atomic_write(self.path, lambda tmp: tmp.write_bytes(data))
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def append_text(self, text: str) -> None:
        """Append to the file (created if missing). Object stores cannot append: there the file is read and written
        whole, which suits small logs (a metrics line per report), not bulk data."""
        if self.is_local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
            return
        old = self.read_text() if self.exists() else ""
        self.write_text(old + text)

    def delete(self) -> None:
        """Remove this file or folder (with its contents); nothing when it does not exist."""
        info = self.info()
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def upload(self, local_dir: Path) -> None:
        """Copy every file under ``local_dir`` into this folder (same relative names)."""
        if self.is_local and Path(self.path) == Path(local_dir).resolve():
            return
        if self.is_local:
            self.fs.create_dir(self.path, recursive=True)
        pafs.copy_files(
            str(local_dir), self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
        )

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """A local folder to write into; its files are uploaded here on a clean exit. A local location is its own
        stage (files land in place)."""
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            yield Path(self.path)
            return
        import tempfile

        with tempfile.TemporaryDirectory(prefix="anyorder-stage-") as tmp:
            yield Path(tmp)
            self.upload(Path(tmp))


def as_location(where: Location | str | os.PathLike) -> Location:
    """``where`` as a ``Location`` (a path or URI is parsed)."""
    return where if isinstance(where, Location) else Location.parse(where)


_FILESYSTEMS: dict[tuple[str, str, str], pafs.FileSystem] = {}


def _filesystem(scheme: str, bucket: str, query: str) -> pafs.FileSystem:
    """One filesystem object per (scheme, bucket, options) and process: S3 clients are costly to create."""
    key = (scheme, bucket if scheme else "", query)
    if key not in _FILESYSTEMS:
        if not scheme:
            _FILESYSTEMS[key] = pafs.LocalFileSystem()
        else:
            uri = f"{scheme}://{bucket}" + (f"?{query}" if query else "")
            try:
                _FILESYSTEMS[key], _ = pafs.FileSystem.from_uri(uri)
            except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
                raise StorageError(
                    f"storage {scheme}://{bucket}: {e}. Check the URI: a path, or a scheme pyarrow.fs knows (s3://, "
                    "gs://, hdfs://, file://) with only that filesystem's options in the query (S3: region, "
                    "endpoint_override, scheme, ...)"
                ) from e
    return _FILESYSTEMS[key]


def check_writable(loc: Location) -> None:
    """Write, read back and delete a small probe file under ``loc``; raise ``StorageError`` naming the URI and
    the fix when any of it fails. Leaves nothing behind (a local folder it had to create is removed again)."""
    created: list[Path] = []
    if loc.is_local:
        path = Path(loc.path)
        while not path.exists() and path != path.parent:
            created.append(path)
            path = path.parent
    probe = loc.child(f".write-check-{secrets.token_hex(6)}")
    payload = b"anyorder-ray storage check\n"
    new_folders: list[Location] = []  # on an object store: loc and its parents that do not exist yet
    try:
        if not loc.is_local:
            folder = loc
            while "/" in folder.path and not folder.exists():
                new_folders.append(folder)
                folder = folder.parent
        if loc.is_local:  # object stores have no folders to create (a marker object would stay behind)
            loc.fs.create_dir(loc.path, recursive=True)
        with loc.fs.open_output_stream(probe.path) as f:
            f.write(payload)
        if probe.read_bytes() != payload:
            raise OSError("a probe file written there read back different")
        loc.fs.delete_file(probe.path)
        if new_folders:  # deleting a file leaves its parent "folders" behind as marker objects
            loc.fs.delete_dir(new_folders[-1].path)
    except Exception as e:  # pyarrow raises OSError subclasses with the backend's message
        raise StorageError(_explain(loc, e)) from e
    finally:
        with contextlib.suppress(Exception):
            if probe.exists():
                loc.fs.delete_file(probe.path)
        for path in created:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()


def _explain(loc: Location, error: BaseException) -> str:
    text = str(error).strip().rstrip(".")
    low = text.lower()
    if loc.is_local:
        fix = "pick a folder you can write to (sweep.storage_path or train.output_dir)"
    elif "bucket" in low and any(s in low for s in ("nosuchbucket", "does not exist", "not found")):
        fix = "the bucket does not exist: create it, or fix its name in sweep.storage_path"
    elif any(s in low for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "credential", "expiredtoken")):
        fix = f"the credentials were refused: {_CREDENTIALS_HINT}"
    elif any(s in low for s in ("access_denied", "accessdenied", "access denied", "forbidden", "403")):
        fix = (
            "access denied: the credentials were refused, or they may not write there; check them "
            f"({_CREDENTIALS_HINT}) and grant write access to the prefix, or pick another location"
        )
    elif any(s in low for s in ("resolve", "connect", "timed out", "timeout", "unreachable")):
        fix = (
            "the storage endpoint cannot be reached: check the URI's host / endpoint_override and the network "
            "(e.g. s3://bucket/prefix?endpoint_override=host:port&scheme=http for an S3 API on another host)"
        )
    else:
        fix = "check the URI (scheme, bucket, prefix) and the credentials"
    if loc.scheme == "s3" and not _aws_credentials_configured():  # requests went out unsigned
        fix = f"no AWS credentials were found in the environment: {_CREDENTIALS_HINT}. Also: {fix}"
    return f"cannot write to storage {loc.uri}: {text}. {fix[0].upper()}{fix[1:]}"


_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role) for S3, "
    "GOOGLE_APPLICATION_CREDENTIALS for GCS, on the machine that starts the sweep and on every node"
)


def _aws_credentials_configured() -> bool:
    env = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    return any(os.environ.get(k) for k in env) or Path("~/.aws/credentials").expanduser().is_file()


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of a ``ray job submit`` (the job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def default_job_root() -> Path:
    """Where a submitted job keeps a relative ``train.output_dir``: Ray deletes the job's working directory (the
    package it unpacked) when the job ends, so results go under the user's home on the head node instead."""
    return Path(os.environ.get("ANYORDER_RAY_HOME", "~/anyorder_ray")).expanduser()
