"""Atomic output files: every file squash writes appears whole or not at all, even under kill -9.

A file is written to a temporary name in the target's own folder (same filesystem, so the final rename is atomic),
flushed to disk, given the permissions a plain open() would give, and renamed over the target; the folder is then
synced so the rename itself survives a crash. A process killed half-way leaves the previous file untouched and a
temporary `.NAME.PID.RANDOM.tmp`; the next write to the same target removes such files whose process is gone, so no
stale temporary file outlives a rerun. Two writers of one target each rename a complete file: the last one wins.

SQUASH_FAULT names a point at which the process kills itself with SIGKILL (tests/test_faults.py uses it to check
the above at each stage of compress and export); unset, fault_point does nothing.
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fault_point(name: str) -> None:
    """Die here, as kill -9 would, when SQUASH_FAULT names this point (testing only)."""
    if os.environ.get("SQUASH_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def temp_name(path: Path) -> Path:
    """.NAME.PID.RANDOM.tmp: the pid says whether its writer still runs; the random part keeps two writers that
    share a pid number (threads, containers on one volume) from ever sharing a name."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale(path: Path) -> list[Path]:
    """Delete temporary files of `path` left by processes that no longer run; returns what was removed."""
    removed = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = p.name[len(path.name) + 2:-4].split(".")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` atomically, on any error it is removed."""
    path = Path(path)
    remove_stale(path)
    tmp = temp_name(path)
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))  # a new name, ours alone
    except OSError as e:  # name the file the user asked for, not the random temporary name
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # readable by others, as any file the user writes
        fault_point("written")
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it is renamed to `path` (left as it is if another process
    made `path` first, as caches do), on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fault_point("written")
        try:
            tmp.rename(path)
        except OSError:  # another process filled it first; anything else is an error
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        _sync_folder(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
