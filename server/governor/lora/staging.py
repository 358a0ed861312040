"""Staged adapter copies: the engine loads a private, read-only copy of exactly the bytes Governor validated.

Validating the user's folder and then handing its path to vLLM leaves a window: whoever can write the folder
can swap the weights, or replace them by a symlink or a pickle vLLM would fall back to, after the checks.
So Governor reads each file it needs once, through a descriptor opened without following symlinks (regular
files only, size-bounded), into STAGING/<sha256 of the content>/, and validates and serves that copy. The
user's folder is never given to the engine; pickles are never copied, so vLLM has nothing to fall back to.

Hard links are refused like symlinks (a file with st_nlink > 1): a hard link is the same file under a second
name, which may lie outside the adapters root, so reading through one breaks "nothing outside the root is
opened". The kernel's fs.protected_hardlinks usually stops a user linking a file they could not read anyway, but
it is a sysctl (off in some containers and older hosts), and Governor may be able to read files the users who
write the root cannot: its state, keys and other tenants' adapters. Copying stays safe either way; the refusal
costs a `cp` instead of a `ln`, and PEFT's save_pretrained, downloads and copies all make one-link files.

Copies are reference-counted: the validation that made one holds a reference until a version takes it over,
the version until it is unloaded. The last release removes the copy; stale copies are removed at start.
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
from dataclasses import dataclass
from pathlib import Path

from governor.errors import InvalidRequest, PayloadTooLarge
from governor.settings import Settings

log = logging.getLogger("governor.lora")

CHUNK = 1024 * 1024
_DIGEST = re.compile(r"[0-9a-f]{64}")
_INCOMING = ".incoming-"


@dataclass(frozen=True)
class Member:
    """A file of the adapter folder that is staged: its name, size bound and whether it must exist."""

    name: str
    limit: int
    required: bool
    param: str = "path"


@dataclass(frozen=True)
class Staged:
    """A staged copy: its content digest (the directory name), where Governor reads it, and file sizes."""

    digest: str
    path: Path
    sizes: dict[str, int]


class AdapterStager:
    """Owns one staging directory. `refusal` set: staging is unavailable and every stage() says why."""

    def __init__(self, root: Path, engine_root: str = "", refusal: str = "", private: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.engine_root = engine_root  # the same directory as the engine sees it, if mounted elsewhere
        self.refusal = refusal
        self.private = private  # a directory Governor made for itself is closed to other users
        self._refs: dict[str, int] = {}
        self._lock = threading.Lock()  # stage() runs in worker threads, release() on the event loop

    # -- copies --------------------------------------------------------------------------------------

    def stage(self, root: Path, folder: Path, members: tuple[Member, ...], shown: str) -> Staged:
        """Copy `members` of `folder` (resolved, inside `root`) into a fresh staged directory; one reference."""
        if self.refusal:
            raise InvalidRequest(self.refusal, param="path", code="adapter_staging_unavailable")
        self._ensure_root()
        incoming = Path(tempfile.mkdtemp(prefix=_INCOMING, dir=self.root))
        try:
            dir_fd = open_folder(root, folder, shown)
            try:
                outer = hashlib.sha256()
                sizes: dict[str, int] = {}
                for member in members:
                    found = _copy_member(dir_fd, member, incoming, shown)
                    if found is None:
                        continue
                    size, file_digest = found
                    sizes[member.name] = size
                    outer.update(member.name.encode() + b"\0" + file_digest)
            finally:
                os.close(dir_fd)
            digest = outer.hexdigest()
            return Staged(digest, self._publish(incoming, digest), sizes)
        except BaseException:
            _remove_tree(incoming)
            raise

    def _publish(self, incoming: Path, digest: str) -> Path:
        final = self.root / digest
        with self._lock:
            if self._refs.get(digest, 0) > 0:
                _remove_tree(incoming)  # the same bytes are staged already: share that copy
            else:
                if final.exists():  # left by an earlier run or a failed removal: ours, but not trusted
                    _remove_tree(final)
                os.chmod(incoming, 0o555)
                os.rename(incoming, final)
            self._refs[digest] = self._refs.get(digest, 0) + 1
        return final

    def release(self, digest: str) -> None:
        """Drop one reference; the last one removes the copy."""
        with self._lock:
            count = self._refs.get(digest, 0) - 1
            if count > 0:
                self._refs[digest] = count
                return
            self._refs.pop(digest, None)
            _remove_tree(self.root / digest)

    def engine_path(self, digest: str) -> str:
        """The staged copy's path as the engine sees it."""
        base = self.engine_root or str(self.root)
        return base.rstrip("/") + "/" + digest

    def clear(self) -> None:
        """Remove every staged copy not held now (at start: all of them, left by an earlier run)."""
        if self.refusal:
            return
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("staging directory %s unreadable: %s", self.root, exc)
            return
        with self._lock:
            for entry in entries:
                ours = _DIGEST.fullmatch(entry.name) or entry.name.startswith(_INCOMING)
                if ours and entry.name not in self._refs and not entry.is_symlink():
                    _remove_tree(Path(entry.path))

    def _ensure_root(self) -> None:
        if self.root.is_dir():
            return
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700 if self.private else 0o755)


# -- reading the user's folder without following links ----------------------------------------------------


def open_folder(root: Path, folder: Path, shown: str) -> int:
    """A descriptor for `folder`, walked down from `root` one component at a time, no symlink followed.

    `folder` was resolved (it has no symlinks); a component replaced by a link since is refused here."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in folder.relative_to(root).parts:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError as exc:
        os.close(fd)
        raise InvalidRequest(
            f"Adapter folder {shown!r} changed while it was read ({exc.strerror}); retry once it is complete.",
            param="path",
        ) from exc
    return fd


def open_file(dir_fd: int, name: str, shown: str) -> tuple[int, os.stat_result]:
    """A blocking descriptor for `name` in the folder `dir_fd` and its stat, or InvalidRequest saying why not.

    Opened without following a symlink and without blocking (a FIFO swapped in must not pin the thread: opening
    one for reading waits for a writer), then refused unless it is a regular file with a single name (no hard
    link, see the module docstring). FileNotFoundError passes through: whether that is an error is the caller's."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidRequest(
                f"{name} in {shown!r} is a symlink; adapter files are never followed through links. "
                "Copy the real file in.",
                param="path",
            ) from exc
        raise InvalidRequest(f"{name} in {shown!r} cannot be read ({exc.strerror}).", param="path") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRequest(f"{name} in {shown!r} is not a regular file.", param="path")
        if st.st_nlink > 1:
            raise InvalidRequest(
                f"{name} in {shown!r} is a hard link (the file has {st.st_nlink} names); adapter files are never read "
                "through links. Copy the file in (cp, not ln).",
                param="path",
            )
        os.set_blocking(fd, True)
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def _copy_member(dir_fd: int, member: Member, incoming: Path, shown: str) -> tuple[int, bytes] | None:
    """Copy one file into `incoming`; (size, sha256) or None when an optional file is absent."""
    try:
        src, st = open_file(dir_fd, member.name, shown)
    except FileNotFoundError as exc:
        if not member.required:
            return None
        raise InvalidRequest(
            f"Adapter folder {shown!r} has no {member.name}; an adapter is a PEFT folder with "
            "adapter_config.json and adapter_model.safetensors (PEFT's save_pretrained writes both).",
            param="path",
        ) from exc
    try:
        _check_size(st.st_size, member)
        digest = hashlib.sha256()
        size = 0
        dst = os.open(incoming / member.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            while chunk := os.read(src, CHUNK):
                size += len(chunk)
                _check_size(size, member)  # it may grow while read
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view) :]
            os.fchmod(dst, 0o444)
        finally:
            os.close(dst)
        return size, digest.digest()
    finally:
        os.close(src)


def _check_size(size: int, member: Member) -> None:
    if size > member.limit:
        raise PayloadTooLarge(
            f"{member.name} is larger than {member.limit} bytes"
            + (" (GOVERNOR_MAX_ADAPTER_BYTES)" if member.name.endswith(".safetensors") else "")
            + "; shrink it.",
            param=member.param,
        )


def _remove_tree(path: Path) -> None:
    """Remove a staged directory; it is read-only, so make it writable first (files need no change)."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(path, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def make_stager(settings: Settings) -> AdapterStager:
    """Staged copies under the state dir; with a remote engine only in a directory the operator says it shares."""
    if settings.staging_dir is not None:
        return AdapterStager(settings.staging_dir, settings.engine_staging_dir, private=False)
    root = settings.resolved_state_dir / "staged"
    if settings.engine_url:
        refusal = (
            "Adapters are refused: the engine is remote (GOVERNOR_ENGINE_URL) and it is given only Governor's "
            "validated copies of adapters, which it must be able to read. Set GOVERNOR_STAGING_DIR to a "
            "directory both Governor and the engine see (and GOVERNOR_ENGINE_STAGING_DIR if the engine mounts "
            "it at another path)."
        )
        return AdapterStager(root, refusal=refusal)
    return AdapterStager(root)
