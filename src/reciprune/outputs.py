"""The output path of a run: one writer at a time, leftovers of killed runs cleaned, the user's umask.

Hidden siblings `.NAME.tmp-PID-*` (a checkpoint being written) and `.NAME.old-PID-*` (the previous
checkpoint while the new one is renamed into place) carry the writer's process id, so the next run
can tell a live writer's folder from one that a `kill -9` left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from reciprune.errors import ReciPruneError


def sibling_folder(output_dir: Path, kind: str) -> Path:
    """A new hidden `.NAME.{kind}-PID-*` folder beside `output_dir` (its parent is created)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{output_dir.name}.{kind}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=prefix))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _writer_pid(folder: Path, output_dir: Path, kind: str) -> int | None:
    rest = folder.name.removeprefix(f".{output_dir.name}.{kind}-")
    pid = rest.split("-", 1)[0]
    return int(pid) if pid.isdigit() and rest != folder.name else None


def clean_stale_siblings(output_dir: Path) -> None:
    """Remove the hidden folders that runs killed while writing `output_dir` left behind, and
    restore a previous checkpoint a kill stranded between its two renames; each with a note."""
    if not output_dir.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for folder in sorted(output_dir.parent.glob(f".{glob_escape(output_dir.name)}.{kind}-*")):
            pid = _writer_pid(folder, output_dir, kind)
            if pid is None or _alive(pid) or not folder.is_dir():
                continue
            if kind == "old" and not output_dir.exists():
                os.replace(folder, output_dir)
                print(f"note: restored {output_dir} from {folder.name}, left by process {pid} "
                      "that was stopped while replacing it", file=sys.stderr)  # fmt: skip
                continue
            shutil.rmtree(folder, ignore_errors=True)
            print(f"note: removed {folder}, left by process {pid} that was stopped while "
                  "writing", file=sys.stderr)  # fmt: skip


def glob_escape(name: str) -> str:
    """`name` with glob wildcards taken literally."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def first_existing(path: Path) -> Path:
    """`path` or its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_refused(folder: Path) -> OSError | None:
    """Why a file cannot be created in `folder`, found by creating (and dropping) one: access()
    says yes to root on folders the kernel refuses (sysfs, some network and FUSE mounts)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".reciprune-probe-"):
            return None
    except OSError as exc:
        return exc


def _lock_path(output_dir: Path) -> Path | None:
    folder = first_existing(output_dir.parent)
    if not folder.is_dir() or write_refused(folder) is not None:
        return None  # check_output_dir explains why this output cannot be written
    digest = hashlib.sha256(str(output_dir).encode()).hexdigest()[:12]
    return folder / f".reciprune-{digest}.lock"


@contextlib.contextmanager
def output_lock(output_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on `output_dir` for a whole run, so a second run into the same
    folder fails at once instead of after all its work; the lock file is removed at the end."""
    target = Path(output_dir).expanduser().absolute()
    path = _lock_path(target)
    if path is None:
        yield
        return
    with path.open("a+") as handle:
        _acquire(handle, target)
        try:
            clean_stale_siblings(target)
            yield
        finally:
            path.unlink(missing_ok=True)  # still held, so no other run has it open as its lock


def _acquire(handle: TextIO, target: Path) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise ReciPruneError(
            f"another reciprune run ({holder}) is writing {target} now. Wait for it to finish, "
            "or choose another --output-dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()}")
    handle.flush()


def apply_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes the user's umask asks for (mkdtemp makes
    0700 folders and some writers 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
