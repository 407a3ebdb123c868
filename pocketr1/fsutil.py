"""Atomic file writes: every file pocket-r1 writes appears whole or not at all (temp name, then rename).

Temp names carry the writer's process id, so a later write can sweep away what a killed writer left
(SIGKILL skips every cleanup) without touching a live writer's temp file. A full disk, a read-only folder
or a quota is a UserError naming the file; the previous copy is left as it was.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pocketr1.errors import UserError

_UMASK = os.umask(0o022)  # read once, at import (setting it is process-wide, so never again while threads run)
os.umask(_UMASK)


def _umasked(mode: int) -> int:
    """`mode` as a plain open()/mkdir() would create it: mkstemp/mkdtemp make private (0600/0700) files,
    which would leave every model folder unreadable to the other users and containers of the machine."""
    return mode & ~_UMASK


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_temps(path: Path) -> None:
    """Remove temp copies of `path` whose writer is dead (killed before it could clean up)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):  # no pid: named before pids were (or by hand)
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def disk_failure(error: BaseException) -> str | None:
    """Why a write failed when the cause is the disk (full, read-only, quota...) rather than a bug, else None.
    safetensors wraps the OS error in its own exception type, so its message is read too."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.strerror or str(error)
    found = re.search(r"I/O error: (.+?) \(os error \d+\)", str(error))
    return found.group(1) if found else None


def _failed_write(path: Path, error: BaseException) -> None:
    """Re-raise a disk failure as a UserError naming `path` (other errors are left to propagate)."""
    reason = disk_failure(error)
    if reason:
        raise UserError(f"cannot write {path}: {reason}; its previous version, if any, is left intact.") from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        _failed_write(path, e)
        raise
    os.fchmod(fd, _umasked(0o666))
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _failed_write(path, e)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}).") from None
    except RecursionError:  # "[[[[..." nested deeper than the parser's stack
        raise UserError(f"{path} is not valid JSON (nested too deeply).") from None


def write_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Build a whole folder under a temp name with `fill(tmpdir)`, then swap it in for `path`.

    A reader never sees a half-written folder: before the swap it sees the old one, after it the new one.
    Between the two renames an old copy sits at `path.old`, which `recover_dir` puts back after a crash.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(path)  # a swap a crash interrupted, and temp folders killed writers left
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
        tmp.chmod(_umasked(0o777))
    except OSError as e:
        _failed_write(path, e)
        raise
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _failed_write(path, e)
        raise
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: str | os.PathLike) -> Path:
    """Undo a swap that a crash interrupted: if only `path.old` exists, it is the last complete copy (beside
    a complete `path` it is a leftover the crash kept from being deleted)."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        os.replace(old, path)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
    sweep_temps(path)
    return path


def check_writable(folder: str | os.PathLike) -> Path:
    """Fail early, in one sentence, if an output folder can't be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {folder}: {e.strerror or e}.") from None
    return folder
