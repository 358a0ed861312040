"""Adapter folders fetched from an object store (`s3://BUCKET/PREFIX/NAME`) or a local URL (`file:///abs/path`).

A listing is cheap and a download is not, so each fetch lists the members first and names the set by a
version string (S3 ETags, or size and mtime of local files); a complete copy of that version in the cache
is returned as is. Copies land in a hidden temporary directory and are renamed into place when complete, so
a version directory that exists is complete. Sizes are checked against the listing and again while bytes
stream in; pickle weights are refused, never fetched. The returned folder is a source: callers stage
(copy) it right away, as for a dropped folder, since a later fetch may replace or evict it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from governor.errors import AdapterNotFound, InvalidRequest, PayloadTooLarge

log = logging.getLogger("governor.lora")

# The same suffixes validate.py refuses in dropped folders; not imported so that validate may import this.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_KEYS = 1000  # entries under one prefix; an adapter folder holds a handful
CHUNK = 1024 * 1024
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_INCOMING = ".incoming-"
_FORMS = "use s3://BUCKET/PREFIX/NAME (bucket: 3-63 lowercase letters, digits, '.' or '-') or file:///absolute/path"


def is_object_url(path: str) -> bool:
    """True for a source given as a URL (s3:// or file://) rather than a folder under the adapters root."""
    return isinstance(path, str) and path.startswith(("s3://", "file://"))


@dataclass(frozen=True)
class Fetched:
    """A fetched adapter folder inside the cache root, and the store's version of its files."""

    folder: Path
    version: str


@dataclass(frozen=True)
class _Entry:
    size: int
    tag: str  # S3 ETag, or "size:mtime_ns" of a local file


class ObjectFetcher:
    """Fetches adapter folders into `cache_root`, one version directory per name, bounded to `max_cache_bytes`.

    `members`: (file name, byte limit, required) of each file an adapter folder may hold; others are ignored.
    """

    def __init__(self, cache_root: Path, max_cache_bytes: int, members: Sequence[tuple[str, int, bool]]) -> None:
        self.cache_root = Path(cache_root).expanduser()
        self.max_cache_bytes = max_cache_bytes
        self.members = tuple(members)
        self._lock = threading.Lock()  # fetches run in worker threads; every cache mutation holds it
        self._client: Any = None

    def fetch(self, name: str, url: str) -> Fetched:
        """The folder of `url`'s current version under the cache, downloaded only when not cached (blocking)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
            raise InvalidRequest(f"Adapter name {name!r} cannot name a cache directory.", param="name")
        source = self._source(url)
        entries = source.list()
        _refuse_pickles(entries, url)
        wanted: dict[str, _Entry] = {}
        for member, limit, required in self.members:
            if member in entries:
                _check_size(entries[member].size, member, limit)
                wanted[member] = entries[member]
            elif required:
                raise AdapterNotFound(
                    f"Adapter folder {url!r} has no {member}; an adapter is a PEFT folder with "
                    "adapter_config.json and adapter_model.safetensors (PEFT's save_pretrained writes both).",
                    param="path",
                )
        version = ";".join(f"{member}={wanted[member].tag}" for member in sorted(wanted))
        # The URL is part of the directory name: two sources may share a version string, not their files.
        final = self.cache_root / name / hashlib.sha256(f"{url}\n{version}".encode()).hexdigest()[:16]
        with self._lock:
            if final.is_dir():
                os.utime(final.parent)
                return Fetched(final, version)
            self.cache_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            final.parent.mkdir(mode=0o700, exist_ok=True)
            incoming = Path(tempfile.mkdtemp(prefix=_INCOMING, dir=final.parent))
        try:
            for member, limit, _ in self.members:
                if member in wanted:
                    with contextlib.closing(source.read(member, wanted[member])) as chunks:  # closes the stream
                        _write_bounded(chunks, incoming / member, member, limit)
            with self._lock:
                if final.is_dir():  # a concurrent fetch of the same version finished first
                    shutil.rmtree(incoming, ignore_errors=True)
                else:
                    os.replace(incoming, final)
                for old in _version_dirs(final.parent):
                    if old != final:
                        shutil.rmtree(old, ignore_errors=True)
                os.utime(final.parent)
                self._evict(keep=name)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        log.info("adapter fetched", extra={"adapter": name, "url": url, "version": version})
        return Fetched(final, version)

    def check(self, url: str) -> None:
        """Refuse a malformed URL, or an s3:// one without boto3 installed, without contacting the store."""
        if _parse(url)[0] == "s3":
            _boto3()

    def _source(self, url: str) -> _S3Source | _FileSource:
        kind, bucket, path = _parse(url)
        if kind == "file":
            return _FileSource(url, Path(path))
        with self._lock:
            if self._client is None:
                # Credentials, region and endpoint (AWS_ENDPOINT_URL) come from boto3's chain: env, ~/.aws, roles.
                self._client = _boto3().client("s3")
        return _S3Source(url, self._client, bucket, path + "/")

    def _evict(self, keep: str) -> None:
        """Drop least recently used names' versions until the cache fits; `keep` (just fetched) stays."""
        with os.scandir(self.cache_root) as found:
            names = [Path(e.path) for e in found if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
        sizes = {name_dir: sum(_tree_bytes(v) for v in _version_dirs(name_dir)) for name_dir in names}
        total = sum(sizes.values())
        for name_dir in sorted(sizes, key=lambda p: p.stat().st_mtime_ns):
            if total <= self.max_cache_bytes:
                break
            if name_dir.name == keep or not sizes[name_dir]:
                continue
            for old in _version_dirs(name_dir):
                shutil.rmtree(old, ignore_errors=True)
            with contextlib.suppress(OSError):  # a fetch of that name may be under way in it
                name_dir.rmdir()
            total -= sizes[name_dir]
            log.info("adapter cache evicted", extra={"adapter": name_dir.name, "bytes": sizes[name_dir]})


class _S3Source:
    """The direct children of one key prefix in an S3-compatible store."""

    def __init__(self, url: str, client: Any, bucket: str, prefix: str) -> None:
        self.url, self.client, self.bucket, self.prefix = url, client, bucket, prefix

    def list(self) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        count = 0
        with _s3_errors(self.url):
            # Delimiter "/": keys in sub-folders come back as one CommonPrefix each, never listed.
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"
            )
            for page in pages:
                count += len(page.get("Contents", ())) + len(page.get("CommonPrefixes", ()))
                if count > MAX_KEYS:
                    raise InvalidRequest(
                        f"Adapter folder {self.url!r} holds more than {MAX_KEYS} objects; an adapter folder "
                        "holds adapter_config.json and adapter_model.safetensors.",
                        param="path",
                    )
                for obj in page.get("Contents", ()):
                    entries[obj["Key"].removeprefix(self.prefix)] = _Entry(int(obj["Size"]), str(obj["ETag"]))
        return entries

    def read(self, member: str, entry: _Entry) -> Generator[bytes, None, None]:
        with _s3_errors(self.url):
            # IfMatch: bytes of the listed version or none, so the version names what was fetched.
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + member, IfMatch=entry.tag)["Body"]
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()


class _FileSource:
    """A local folder given as file:///abs/path; members are read without following symlinks."""

    def __init__(self, url: str, path: Path) -> None:
        self.url, self.path = url, path

    def list(self) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        try:
            with os.scandir(self.path) as found:
                for item in found:
                    st = item.stat(follow_symlinks=False)
                    entries[item.name] = _Entry(st.st_size, f"{st.st_size}:{st.st_mtime_ns}")
        except FileNotFoundError as exc:
            raise AdapterNotFound(f"Adapter folder {self.url!r} does not exist.", param="path") from exc
        except OSError as exc:
            raise InvalidRequest(f"Adapter folder {self.url!r} cannot be read ({exc.strerror}).", param="path") from exc
        return entries

    def read(self, member: str, entry: _Entry) -> Generator[bytes, None, None]:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO must not hang us
        try:
            fd = os.open(self.path / member, flags)
        except OSError as exc:
            why = "is a symlink; adapter files are never followed through links" if exc.errno == errno.ELOOP else ""
            raise InvalidRequest(
                f"{member} in {self.url!r} {why or f'cannot be read ({exc.strerror})'}.", param="path"
            ) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidRequest(f"{member} in {self.url!r} is not a regular file.", param="path")
            if f"{st.st_size}:{st.st_mtime_ns}" != entry.tag:
                raise InvalidRequest(f"{member} in {self.url!r} changed while it was read; retry.", param="path")
            os.set_blocking(fd, True)
            while chunk := os.read(fd, CHUNK):
                yield chunk
        finally:
            os.close(fd)


def _parse(url: str) -> tuple[str, str, str]:
    """("s3", bucket, key prefix) or ("file", "", absolute path); anything else is refused with the forms accepted."""
    bad = InvalidRequest(f"Adapter source {url!r} is not a supported URL; {_FORMS}.", param="path")
    if not isinstance(url, str) or "\0" in url:
        raise bad
    if url.startswith("file://"):
        path = unquote(url.removeprefix("file://"))  # file URLs are percent-encoded (Path.as_uri writes %20)
        if not path.startswith("/") or "\0" in path or not _clean_segments(path.strip("/")):
            raise bad
        return "file", "", path
    if not url.startswith("s3://"):
        raise bad
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix.removesuffix("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or not _clean_segments(prefix) or len(prefix) > 1000:
        raise bad
    return "s3", bucket, prefix


def _boto3() -> Any:
    try:
        import boto3
    except ImportError as exc:
        raise InvalidRequest(
            "Adapters from s3:// URLs need boto3; install it with `pip install 'governor[s3]'`.", param="path"
        ) from exc
    return boto3


@contextlib.contextmanager
def _s3_errors(url: str) -> Iterator[None]:
    """botocore's failures as typed errors naming the URL; no raw exception leaves a fetch."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "NoSuchKey", "404"):
            raise AdapterNotFound(f"Adapter source {url!r} does not exist ({code}).", param="path") from exc
        if code in ("PreconditionFailed", "412"):
            raise InvalidRequest(f"Adapter source {url!r} changed while it was fetched; retry.", param="path") from exc
        raise InvalidRequest(f"Adapter source {url!r} cannot be fetched ({code or exc}).", param="path") from exc
    except NoCredentialsError as exc:
        hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or configure ~/.aws"
        raise InvalidRequest(f"Adapter source {url!r} needs credentials: {hint}.", param="path") from exc
    except BotoCoreError as exc:  # endpoint unreachable, timeouts, bad region
        raise InvalidRequest(f"Adapter source {url!r} cannot be fetched ({exc}).", param="path") from exc


def _clean_segments(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and all(p and p not in (".", "..") and p.isprintable() for p in parts)


def _refuse_pickles(entries: Iterable[str], url: str) -> None:
    names = sorted(e for e in entries if e.lower().endswith(PICKLE_SUFFIXES))
    if names:
        raise InvalidRequest(
            f"Adapter folder {url!r} contains pickle weights ({', '.join(names[:3])}); pickles can run code "
            "and are never loaded. Save with safetensors (adapter_model.safetensors) and remove them.",
            param="path",
        )


def _check_size(size: int, member: str, limit: int) -> None:
    if size > limit:
        raise PayloadTooLarge(f"{member} is larger than {limit} bytes; shrink it.", param="path")


def _write_bounded(chunks: Iterable[bytes], dest: Path, member: str, limit: int) -> None:
    """Write `chunks` to a new file (0o600), stopping as soon as they pass `limit`: listings can be wrong."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        size = 0
        for chunk in chunks:
            size += len(chunk)
            _check_size(size, member, limit)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _version_dirs(name_dir: Path) -> list[Path]:
    """A name's complete version directories (hidden ones are fetches under way)."""
    with contextlib.suppress(FileNotFoundError), os.scandir(name_dir) as found:
        return [Path(e.path) for e in found if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    return []


def _tree_bytes(path: Path) -> int:
    with os.scandir(path) as found:
        return sum(e.stat(follow_symlinks=False).st_size for e in found if e.is_file(follow_symlinks=False))
