"""Where durable checkpoints live: a local directory or an fsspec URL, behind one small interface.

``open_storage("/data/ckpt")`` gives ``LocalStorage``: files are written under a temporary name, fsynced,
renamed into place, and the directory is fsynced, so a crash leaves either the old bytes or the new ones.
While a file is written, write-back of each written piece is started at once (Linux ``sync_file_range``),
so the device works while the next piece is checksummed and the final fsync is short.

``open_storage("s3://bucket/prefix", **storage_options)`` gives ``FsspecStorage``: object stores have no
rename and no fsync, but an object becomes visible only when its upload completes, so files are written
straight to their final names and ``sync``/``fsync_dir`` are no-ops. Either way the checkpoint's manifest,
written last, is the commit point.

Paths handed to a storage are relative to its root, with ``/`` as separator.
"""

from __future__ import annotations

import abc
import ctypes
import errno
import os
import shutil
import uuid
from typing import BinaryIO

from resilient.errors import ConfigError, PersistError

TEMP_SUFFIX = ".tmp"


def has_scheme(location: str) -> bool:
    """True for ``s3://...``, ``memory://...``, ``file://...``; False for plain paths."""
    head, sep, _ = location.partition("://")
    return bool(sep) and head.isidentifier()


class FileWriter(abc.ABC):
    """A file being written: ``write`` chunks, ``sync`` them to stable storage, ``publish`` under the
    final name, or ``abort`` (removes what was written)."""

    @abc.abstractmethod
    def write(self, data: memoryview | bytes) -> None:
        """Append ``data`` (all of it)."""

    @abc.abstractmethod
    def sync(self) -> None:
        """Make the written bytes durable (fsync) before they are published."""

    @abc.abstractmethod
    def publish(self) -> None:
        """Make the file visible under its final name, atomically."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Give up: close and remove whatever was written. Safe to call more than once."""


class Storage(abc.ABC):
    """The operations a checkpoint needs from a file system."""

    location: str

    @abc.abstractmethod
    def makedirs(self, path: str) -> None:
        """Create directory ``path`` (and parents) if missing."""

    @abc.abstractmethod
    def list_dir(self, path: str) -> list[str]:
        """Names (not paths) of the entries of directory ``path``; empty if it does not exist."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether a file or directory ``path`` exists."""

    @abc.abstractmethod
    def size(self, path: str) -> int:
        """Size in bytes of file ``path``; ``FileNotFoundError`` if missing."""

    @abc.abstractmethod
    def open_read(self, path: str) -> BinaryIO:
        """A binary file object for reading ``path`` (supports ``read`` and ``readinto``)."""

    @abc.abstractmethod
    def writer(self, path: str) -> FileWriter:
        """Start writing file ``path`` (see ``FileWriter``)."""

    @abc.abstractmethod
    def fsync_dir(self, path: str) -> None:
        """Make the directory entries of ``path`` (creations, renames, removals) durable."""

    @abc.abstractmethod
    def remove(self, path: str) -> None:
        """Remove file ``path``; missing is fine."""

    @abc.abstractmethod
    def remove_tree(self, path: str) -> None:
        """Remove directory ``path`` and everything under it; missing is fine."""

    #: whether ``rename`` moves a directory atomically (local and mounted POSIX file systems; not object stores)
    atomic_rename = False

    def rename(self, path: str, new_path: str) -> None:
        """Move directory ``path`` to ``new_path`` atomically: ``FileNotFoundError`` if ``path`` is gone (someone
        else moved or removed it), ``FileExistsError`` if ``new_path`` exists. Storages without an atomic rename
        (``atomic_rename`` False: object stores, where a "rename" is a copy) refuse with ``PersistError``;
        callers check ``atomic_rename`` first."""
        raise PersistError(f"{self.describe(path)} cannot be renamed: {self.location} has no atomic rename "
                           "(an object store copies instead); move it with the store's own tools.")

    def describe(self, path: str = "") -> str:
        """A human-readable full location of ``path`` for messages."""
        return self.location.rstrip("/") + ("/" + path if path else "")

    def read_bytes(self, path: str) -> bytearray:
        """Whole file into one writable buffer (tensors are later viewed from it without a copy)."""
        with self.open_read(path) as fh:
            size = self.size(path)
            buf = bytearray(size)
            view = memoryview(buf)
            got = 0
            while got < size:
                n = fh.readinto(view[got:])
                if not n:
                    raise EOFError(f"{self.describe(path)} ended after {got} of {size} bytes.")
                got += n
            return buf


# --- local files ------------------------------------------------------------------------------------
_WRITE_CHUNK = 64 << 20  # one os.write call stays well below Linux's ~2 GiB cap
_SYNC_FILE_RANGE_WRITE = 2
_EARLY_WRITEBACK_MIN = 1 << 20


def _load_sync_file_range():
    """libc's sync_file_range (Linux), or None: used to start write-back of written bytes early."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


class _LocalWriter(FileWriter):
    def __init__(self, final_path: str) -> None:
        self._final = final_path
        directory, name = os.path.split(final_path)
        self._temp = os.path.join(directory, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
        self._fd: int | None = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._offset = 0
        self._early_writeback = _sync_file_range is not None

    def write(self, data: memoryview | bytes) -> None:
        if self._fd is None:
            raise ValueError(f"{self._final} is closed")
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view[:_WRITE_CHUNK])
            view = view[n:]
            if self._early_writeback and n >= _EARLY_WRITEBACK_MIN:
                # Start the device writing these pages now, so the final fsync has little left to wait for
                # (the hashing of the next bytes overlaps the I/O). A file system that refuses just skips it.
                if _sync_file_range(self._fd, self._offset, n, _SYNC_FILE_RANGE_WRITE) != 0:
                    self._early_writeback = False
            self._offset += n

    def sync(self) -> None:
        if self._fd is None:
            raise ValueError(f"{self._final} is closed")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None

    def publish(self) -> None:
        if self._fd is not None:
            raise ValueError(f"{self._final} must be synced before it is published")
        os.replace(self._temp, self._final)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass


class LocalStorage(Storage):
    """A directory on a local (or mounted) POSIX file system."""

    def __init__(self, root: str) -> None:
        self.location = os.path.abspath(root)

    def _p(self, path: str) -> str:
        return os.path.join(self.location, *[p for p in path.split("/") if p]) if path else self.location

    def makedirs(self, path: str) -> None:
        os.makedirs(self._p(path), exist_ok=True)

    def list_dir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._p(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, path: str) -> bool:
        return os.path.exists(self._p(path))

    def size(self, path: str) -> int:
        return os.stat(self._p(path)).st_size

    def open_read(self, path: str) -> BinaryIO:
        return open(self._p(path), "rb", buffering=0)

    def writer(self, path: str) -> FileWriter:
        return _LocalWriter(self._p(path))

    def fsync_dir(self, path: str) -> None:
        fd = os.open(self._p(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, path: str) -> None:
        try:
            os.unlink(self._p(path))
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        try:
            shutil.rmtree(self._p(path))
        except FileNotFoundError:
            pass

    atomic_rename = True

    def rename(self, path: str, new_path: str) -> None:
        target = self._p(new_path)
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "already exists", target)
        os.rename(self._p(path), target)

    def describe(self, path: str = "") -> str:
        return self._p(path)


# --- fsspec (object stores and other remote file systems) -------------------------------------------
class _FsspecWriter(FileWriter):
    def __init__(self, fs, path: str) -> None:
        self._fs = fs
        self._path = path
        self._fh = fs.open(path, "wb")

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            chunk = view[:_WRITE_CHUNK]
            self._fh.write(chunk)
            view = view[len(chunk):]

    def sync(self) -> None:
        self._fh.flush()

    def publish(self) -> None:
        self._fh.close()  # the object becomes visible, whole, when its upload completes

    def abort(self) -> None:
        try:
            if not self._fh.closed:
                discard = getattr(self._fh, "discard", None)
                if discard is not None:
                    discard()
                else:
                    self._fh.close()
        finally:
            if self._fs.exists(self._path):
                self._fs.rm(self._path)


class FsspecStorage(Storage):
    """Any fsspec file system (``s3://``, ``gs://``, ``memory://``...), rooted at a URL."""

    def __init__(self, url: str, **storage_options) -> None:
        import fsspec

        self.location = url.rstrip("/")
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as exc:
            raise ConfigError(
                f"Cannot open checkpoint location {url!r} through fsspec: {exc}. Install the fsspec backend "
                f"for its scheme (e.g. s3fs for s3://) or pass a local path."
            ) from exc
        self._root = root.rstrip("/")

    def _p(self, path: str) -> str:
        return f"{self._root}/{path.strip('/')}" if path else self._root

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(self._p(path), exist_ok=True)

    def list_dir(self, path: str) -> list[str]:
        full = self._p(path)
        self.fs.invalidate_cache(full)
        try:
            entries = self.fs.ls(full, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        prefix = full.rstrip("/") + "/"
        return sorted({e.rstrip("/")[len(prefix):] for e in entries if e.rstrip("/").startswith(prefix)} - {""})

    def exists(self, path: str) -> bool:
        full = self._p(path)
        self.fs.invalidate_cache(full)
        return self.fs.exists(full)

    def size(self, path: str) -> int:
        full = self._p(path)
        self.fs.invalidate_cache(full)
        info = self.fs.info(full)
        return int(info["size"])

    def open_read(self, path: str) -> BinaryIO:
        return self.fs.open(self._p(path), "rb")

    def writer(self, path: str) -> FileWriter:
        return _FsspecWriter(self.fs, self._p(path))

    def fsync_dir(self, path: str) -> None:
        return None  # object stores have no directory entries to sync

    def remove(self, path: str) -> None:
        full = self._p(path)
        try:
            self.fs.rm(full)
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        full = self._p(path)
        try:
            self.fs.rm(full, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(full)

    def describe(self, path: str = "") -> str:
        return self.location + ("/" + path.strip("/") if path else "")


def open_storage(location: str | Storage, **storage_options) -> Storage:
    """A ``Storage`` for a local path or a URL with a scheme (through fsspec); a ``Storage`` is returned as is."""
    if isinstance(location, Storage):
        return location
    if not isinstance(location, str) or not location:
        raise ConfigError(f"A checkpoint directory must be a non-empty path or URL, got {location!r}.")
    if location.startswith("file://"):
        return LocalStorage(location[len("file://"):])
    if has_scheme(location):
        return FsspecStorage(location, **storage_options)
    return LocalStorage(location)
