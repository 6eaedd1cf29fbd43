"""Every file system call the storage engine makes, and how its failures map to errors.

Keeping them in one module gives one place to reason about durability (which call is followed
by which fsync) and one place for tests to inject faults (``monkeypatch`` this module's ``os``).
"""

from __future__ import annotations

import errno
import os

from meshmq._errors import StorageError

__all__ = [
    "FatalStorageError",
    "close_fd",
    "datasync",
    "fsync_dir",
    "ftruncate",
    "open_append",
    "open_read",
    "pread",
    "read_file",
    "storage_error",
    "sync_path",
    "truncate_path",
    "unlink",
    "write_all",
    "write_file_atomic",
]

_BINARY = getattr(os, "O_BINARY", 0)  # Windows text-mode translation must never touch a log


class FatalStorageError(StorageError):
    """A StorageError after which the log must not write again (an fsync failed)."""


def storage_error(exc: OSError, what: str, fatal: bool = False) -> StorageError:
    """Wrap an OSError as a StorageError (or FatalStorageError) saying what was attempted."""
    cls = FatalStorageError if fatal else StorageError
    err = cls(exc.errno or errno.EIO, f"{what}: {exc.strerror or exc}")
    err.filename = exc.filename
    return err


def datasync(fd: int) -> None:
    """Flush a file's data, and the metadata needed to read it back, to stable storage."""
    # fdatasync skips metadata such as mtime but still flushes the file size, which is all an
    # append needs. Platforms without it (macOS, Windows) get fsync.
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def fsync_dir(directory: str) -> None:
    """Make creations, renames and deletions in ``directory`` durable; fatal on failure."""
    if os.name == "nt":  # Windows cannot open a directory; NTFS journals names itself.
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise storage_error(exc, f"open directory {directory}") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise storage_error(exc, f"fsync directory {directory}", fatal=True) from exc
    finally:
        os.close(fd)


def sync_path(path: str) -> None:
    """fdatasync a file by name; FatalStorageError if the fsync fails."""
    fd = open_read(path)
    try:
        datasync(fd)
    except OSError as exc:
        raise storage_error(exc, f"fsync {path}", fatal=True) from exc
    finally:
        close_fd(fd)


def open_read(path: str) -> int:
    """Open a file read-only; StorageError on failure."""
    try:
        return os.open(path, os.O_RDONLY | _BINARY)
    except OSError as exc:
        raise storage_error(exc, f"open {path}") from exc


def open_append(path: str, create: bool) -> int:
    """Open a segment for appending (O_APPEND), creating it exclusively if ``create``."""
    flags = os.O_WRONLY | os.O_APPEND | _BINARY | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        raise storage_error(exc, f"{'create' if create else 'open'} segment {path}") from exc


def close_fd(fd: int) -> None:
    """Close a descriptor; a failure to close changes nothing already synced, so it is ignored."""
    try:
        os.close(fd)
    except OSError:
        pass


def pread(fd: int, size: int, position: int, path: str) -> bytes:
    """Read up to ``size`` bytes at ``position``; StorageError on an I/O error."""
    try:
        return os.pread(fd, size, position)
    except OSError as exc:
        raise storage_error(exc, f"read {path}") from exc


def write_all(fd: int, data: bytes | bytearray) -> None:
    """Write every byte, looping over short writes; raises the OSError of a failed write."""
    n = os.write(fd, data)
    if n == len(data):   # the usual case: one call, no memoryview
        return
    view = memoryview(data)
    done = 0
    while True:
        if n <= 0:  # a regular file only does this when the device is out of space
            raise OSError(errno.ENOSPC, "write made no progress")
        done += n
        if done >= len(view):
            return
        n = os.write(fd, view[done:])


def ftruncate(fd: int, size: int) -> None:
    """Cut an open file to ``size`` bytes; raises OSError."""
    os.ftruncate(fd, size)


def truncate_path(path: str, size: int, sync: bool) -> None:
    """Cut a file to ``size`` bytes and, if ``sync``, make the cut durable."""
    try:
        fd = os.open(path, os.O_WRONLY | _BINARY)
    except OSError as exc:
        raise storage_error(exc, f"open {path} to truncate") from exc
    try:
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise storage_error(exc, f"truncate {path}") from exc
        if sync:
            try:
                datasync(fd)
            except OSError as exc:
                raise storage_error(exc, f"fsync {path}", fatal=True) from exc
    finally:
        close_fd(fd)


def read_file(path: str) -> bytes:
    """Return a whole (small) file's bytes; raises OSError."""
    fd = os.open(path, os.O_RDONLY | _BINARY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        close_fd(fd)


def write_file_atomic(path: str, data: bytes, sync: bool) -> None:
    """Replace ``path`` with ``data`` via a temporary file and a rename.

    Raises OSError if writing fails (the temporary file is removed), FatalStorageError if the
    fsync does. The caller fsyncs the directory if the rename itself must be durable.
    """
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _BINARY, 0o644)
        try:
            write_all(fd, data)
            if sync:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    raise storage_error(exc, f"fsync {tmp}", fatal=True) from exc
        finally:
            close_fd(fd)
        os.replace(tmp, path)
    except OSError:
        unlink(tmp)
        raise


def unlink(path: str) -> bool:
    """Remove a file if it exists; False (and no error) if it could not be removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
