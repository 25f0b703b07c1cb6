"""Writing files without following symbolic links, and without half-written results.

Every file pyro-vae writes -- in a run folder (lock, checkpoint, metrics, config, labels,
eval.json, diagnostics.json, figures) and the outputs of its commands -- goes through
this module, which makes three promises:

- **No write through a symbolic link.** The folders between a *root* (a run folder, or
  the folder of an output file) and the file are opened one at a time relative to the one
  above, with ``O_NOFOLLOW | O_DIRECTORY``, and the file is then named relative to its
  folder's descriptor (``dir_fd``): a symlink planted anywhere below the root -- a file,
  a ``figures`` folder, a temporary name -- is refused with :class:`UnsafePathError`,
  never followed, and cannot be swapped in between the check and the write. The root
  itself is the user's choice and may be a link.
- **Whole files are atomic.** :func:`write_atomic` writes a fresh temporary name
  (``O_CREAT | O_EXCL | O_NOFOLLOW``), fsyncs it and renames it over the target: readers
  see the old file or the new one; a failed write (a full disk) leaves the old one and
  removes the temporary file.
- **A read-only folder stays as it is.** A folder whose permission bits deny its owner
  writing is refused with :class:`ReadOnlyError` before anything is created, even for a
  process (root) that the kernel would let through.

Appends (:func:`append`) and locks (:func:`open_lock`) open the file itself with
``O_NOFOLLOW``; :func:`read_bytes` reads without following a link.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import RunDirError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class UnsafePathError(RunDirError):
    """A symbolic link where pyro-vae would write (or read a run's file)."""


class ReadOnlyError(RunDirError):
    """A folder whose permission bits say it must not be written."""


def _link_refused(path: Path) -> UnsafePathError:
    return UnsafePathError(f"{path} is a symbolic link, and pyro-vae writes (and reads run "
                           "files) through none; remove the link, or put the real file or "
                           "folder there, and run again")


@contextlib.contextmanager
def folder(path: str | os.PathLike, root: str | os.PathLike | None = None,
           create: bool = False) -> Iterator[int]:
    """A descriptor of ``path`` opened from ``root`` without following links below it.

    ``root`` defaults to ``path`` itself; ``path`` must lie inside it. With ``create``,
    missing folders are made (the root with its parents, the rest one by one).
    """
    path = Path(path)
    root = Path(root) if root is not None else path
    parts = path.relative_to(root).parts  # ValueError: a caller's bug, not user input
    if create:
        root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, _DIR_FLAGS)
    try:
        where = root
        for part in parts:
            where = where / part
            if create and not _exists(fd, part):
                _check_writable(fd, where.parent)
                with contextlib.suppress(FileExistsError):  # made meanwhile: checked below
                    os.mkdir(part, 0o777, dir_fd=fd)
            try:
                inner = os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(fd, part):
                    raise _link_refused(where) from None
                raise
            os.close(fd)
            fd = inner
        yield fd
    finally:
        os.close(fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _check_writable(dir_fd: int, path: Path) -> None:
    if not os.fstat(dir_fd).st_mode & stat.S_IWUSR:
        raise ReadOnlyError(f"{path} is read-only (its permissions deny writing); make it "
                            f"writable (chmod u+w {path}) or write elsewhere")


def _target(dir_fd: int, name: str, path: Path) -> None:
    """Refuse a link where a file is about to be written, or a read-only folder."""
    if _is_link(dir_fd, name):
        raise _link_refused(path)
    _check_writable(dir_fd, path.parent)


def write_atomic(path: str | os.PathLike, data: bytes | str,
                 root: str | os.PathLike | None = None, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` at once: a temporary file, fsync, rename, fsync.

    ``root``: the folder below which no link is followed (default: ``path``'s folder).
    """
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    with folder(path.parent, root if root is not None else path.parent, create=True) as dfd:
        _target(dfd, path.name, path)
        tmp = f".{path.name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dfd)
        try:
            with named_errors(path), os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        with contextlib.suppress(OSError):  # the rename itself survives a crash
            os.fsync(dfd)


def append(path: str | os.PathLike, data: bytes | str,
           root: str | os.PathLike | None = None) -> None:
    """Append ``data`` to ``path`` in one write and fsync it (the file is created if needed)."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    with folder(path.parent, root if root is not None else path.parent) as dfd:
        _target(dfd, path.name, path)
        fd = _open_file(dfd, path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with named_errors(path), os.fdopen(fd, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def open_lock(path: str | os.PathLike, root: str | os.PathLike | None = None):
    """``path`` opened for reading and writing (created if missing), never through a link."""
    path = Path(path)
    with folder(path.parent, root if root is not None else path.parent) as dfd:
        fd = _open_file(dfd, path, os.O_RDWR | os.O_CREAT)
    return os.fdopen(fd, "r+")


def read_bytes(path: str | os.PathLike) -> bytes:
    """The content of ``path``, refusing a symbolic link in its place."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP and path.is_symlink():
            raise _link_refused(path) from None
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


@contextlib.contextmanager
def named_errors(path: str | os.PathLike):
    """Give an ``OSError`` raised by a write (a full disk) the file's name."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def _open_file(dir_fd: int, path: Path, flags: int) -> int:
    try:
        return os.open(path.name, flags | _NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_refused(path) from None
        raise


def check_writable(path: str | os.PathLike, root: str | os.PathLike | None = None,
                   no_links: bool = False) -> None:
    """Create the folder ``path`` (below ``root``) if needed and prove it writable: a file
    is made there (never through a link) and removed; with ``no_links``, a link already in
    it is refused (a folder whose files pyro-vae names, such as a run's ``figures``).
    Raises ``OSError``, :class:`UnsafePathError` or :class:`ReadOnlyError`."""
    with folder(path, root, create=True) as dfd:
        for entry in os.scandir(dfd) if no_links else ():
            if entry.is_symlink():
                raise _link_refused(Path(path) / entry.name)
        _check_writable(dfd, Path(path))
        probe = f".write-test.{secrets.token_hex(6)}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600,
                         dir_fd=dfd))
        os.unlink(probe, dir_fd=dfd)


def refuse_link(path: str | os.PathLike) -> None:
    """Raise :class:`UnsafePathError` if ``path`` is a symbolic link."""
    if Path(path).is_symlink():
        raise _link_refused(Path(path))


def remove_tree(path: str | os.PathLike) -> None:
    """Remove the folder ``path`` and what it holds; a link in its place is refused, and
    links inside are removed, not followed (``shutil.rmtree``'s descriptor-based walk)."""
    refuse_link(path)
    if Path(path).is_dir():
        shutil.rmtree(path)


MAX_JSON_BYTES = 10_000_000  # no file pyro-vae reads as JSON is larger
MAX_JSON_DEPTH = 64  # nor nested deeper
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def parse_json(data: bytes | str):
    """``json.loads`` for files users may damage: :class:`ValueError` (one line, saying
    what is wrong) for invalid JSON, text that is not UTF-8, input larger than
    :data:`MAX_JSON_BYTES` or nested deeper than :data:`MAX_JSON_DEPTH`."""
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"larger than {MAX_JSON_BYTES} bytes")
    if isinstance(data, bytes):
        try:
            data = data.decode()
        except UnicodeDecodeError:
            raise ValueError("not valid JSON (not UTF-8 text)") from None
    depth = deepest = 0
    for char in _STRING.sub("", data):  # the brackets outside strings
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    if deepest > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON (line {e.lineno}: {e.msg})") from None
