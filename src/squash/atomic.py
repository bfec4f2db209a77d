"""Atomic output files: every file squash writes appears whole or not at all, even under kill -9.

A file is written to a temporary name in the target's own folder (same filesystem, so the final rename is atomic),
flushed to disk, given the permissions a plain open() would give, and renamed over the target; the folder is then
synced so the rename itself survives a crash. A process killed half-way leaves the previous file untouched and a
temporary `.NAME.PID.tmp`; the next write to the same target removes such files whose process is gone, so no
stale temporary file outlives a rerun. Two writers of one target each rename a complete file: the last one wins.

SQUASH_FAULT names a point at which the process kills itself with SIGKILL (tests/test_faults.py uses it to check
the above at each stage of compress and export); unset, fault_point does nothing.
"""
from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fault_point(name: str) -> None:
    """Die here, as kill -9 would, when SQUASH_FAULT names this point (testing only)."""
    if os.environ.get("SQUASH_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def temp_name(path: Path, pid: int | None = None) -> Path:
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}.tmp")


def remove_stale(path: Path) -> list[Path]:
    """Delete temporary files of `path` left by processes that no longer run; returns what was removed."""
    removed = []
    for p in path.parent.glob(f".{path.name}.*.tmp"):
        pid = p.name[len(path.name) + 2:-4]
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
    tmp.unlink(missing_ok=True)  # ours from an earlier, failed write in this process (or a planted link)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
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
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fault_point("written")
        try:
            tmp.rename(path)
        except OSError:  # another process filled it first
            shutil.rmtree(tmp, ignore_errors=True)
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
