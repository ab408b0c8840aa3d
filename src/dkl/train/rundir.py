"""The run folder: one live run at a time, no finished run replaced by accident, and the files a
run was made from.

- :class:`RunLock`: an exclusive ``flock`` on ``<run>/.lock`` (which holds the owner's pid),
  taken before anything is written. The operating system drops it when the process ends, however
  it ends, so a crash leaves no stale lock behind; a second run of the same folder is refused
  while the first lives.
- :func:`previous_run`: the result files of an earlier run in the folder (``train.overwrite``
  decides whether a new run may replace them; :func:`clear_previous_run` does).
- :func:`source_files`: the SHA-256 of every file the config points at (``model.checkpoint``,
  ``distill.teacher.checkpoint``, any ``*.checkpoint`` key): the checkpoints record them under
  ``"made_from"``, and a resumed run compares them with the files as they are now.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import IO, Any

from dkl._files import file_sha256

__all__ = [
    "LOCK_NAME",
    "RESULT_FILES",
    "RunFolderBusy",
    "RunLock",
    "clear_previous_run",
    "previous_run",
    "source_files",
]

LOCK_NAME = ".lock"
#: what a run writes; their presence means the folder holds a run
RESULT_FILES = (
    "final.pt", "last.pt", "best.pt", "summary.json", "metrics.jsonl", "curves.png", "robust.json",
)  # fmt: skip


class RunFolderBusy(FileExistsError):
    """Another live process is training in this run folder."""


def _lock(f: IO[str]) -> bool:
    """An exclusive, non-blocking lock on the open file ``f``; ``False`` when another holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _same_file(f: IO[str], path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except OSError:
        return False


_ORPHAN_WAIT = 10.0  # seconds


def _gone(owner: str) -> bool:
    """Whether the process ``owner`` (a pid as text) has exited."""
    try:
        os.kill(int(owner), 0)
    except ProcessLookupError:
        return True
    except (ValueError, OverflowError, OSError):  # no pid, or alive and another user's
        return False
    return False


def _busy(folder: Path, owner: str) -> str:
    if _gone(owner):
        return (
            f"run folder '{folder}' is still locked by the worker processes of run pid {owner}, "
            f"which has exited: wait for them to end (or end them), then resume"
        )
    return (
        f"run folder '{folder}' is in use by a live process (pid {owner}): another run of the "
        f"same name? Wait for it to end, or choose another name=... or --out"
    )


class RunLock:
    """Hold ``folder/.lock`` for the life of a run (a context manager, or acquire / release).

    The lock is the ``flock`` on the open file, not the file's existence: the file stays after
    the run (removing it would let two later runs lock two different files).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._file: IO[str] | None = None
        self._created = False

    def acquire(self) -> RunLock:
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        waited = 0.0
        for _ in range(10):
            f = open(path, "a+")  # noqa: SIM115  (held open: it is the lock)
            while not _lock(f):
                f.seek(0)
                owner = f.read().strip() or "unknown"
                # a run killed outright (kill -9) leaves its DataLoader workers holding the lock
                # they inherited for a second or two, until they see their parent gone
                if not _gone(owner) or waited >= _ORPHAN_WAIT:
                    f.close()
                    raise RunFolderBusy(_busy(self.folder, owner))
                time.sleep(0.2)
                waited += 0.2
            if _same_file(f, path):
                break
            f.close()  # a run that was leaving removed the file we locked: lock the new one
        else:
            raise RunFolderBusy(f"run folder '{self.folder}': could not lock '{path}'")
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        except OSError as e:
            f.close()
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise OSError(e.errno, f"could not write the run's lock file '{path}': {reason}") from e
        self._file = f
        return self

    def release(self) -> None:
        """Drop the lock; a folder this run created and left empty is removed again."""
        if self._file is None:
            return
        self._file.close()  # closing the file drops the flock
        self._file = None
        if self._created:
            left = [p.name for p in self.folder.iterdir()]
            if left == [LOCK_NAME]:
                (self.folder / LOCK_NAME).unlink(missing_ok=True)
                try:
                    self.folder.rmdir()
                except OSError:
                    pass

    def __enter__(self) -> RunLock:  # noqa: PYI034
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def previous_run(folder: str | Path) -> list[str]:
    """The names of the result files an earlier run left in ``folder`` (empty: none)."""
    folder = Path(folder)
    return [name for name in RESULT_FILES if (folder / name).is_file()]


def clear_previous_run(folder: str | Path) -> list[str]:
    """Delete an earlier run's result files (``train.overwrite=true``); returns their names."""
    gone = previous_run(folder)
    for name in gone:
        (Path(folder) / name).unlink(missing_ok=True)
    return gone


def _checkpoint_keys(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out += _checkpoint_keys(v, key + ".")
            elif k == "checkpoint" and isinstance(v, str) and v:
                out.append((key, v))
    return out


def source_files(config: dict) -> dict[str, dict[str, str]]:
    """``{dotted key: {"path", "sha256"}}`` for each existing file a ``*.checkpoint`` key of the
    config dict names: what a run is made from (its teacher, its initial weights)."""
    out = {}
    for key, path in _checkpoint_keys(config):
        if Path(path).is_file():
            out[key] = {"path": path, "sha256": file_sha256(path)}
    return out


def describe_source(key: str) -> str:
    """``distill.teacher.checkpoint`` -> ``teacher``; ``model.checkpoint`` -> ``initial weights``."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] != "model":
        return parts[-2]
    return "initial weights"
