"""Run-folder I/O shared by training, evaluation, sweeps and reports (no torch, no training code).

A run folder holds ``training_options.json``, ``stats.jsonl`` (one JSON record per logged step),
the saved pipeline, ``checkpoint-<step>/`` folders and ``eval/``. This module reads and writes those
files safely:

* JSON is written to a temporary file in the same folder and renamed over the target
  (:func:`write_json_atomic`), so a reader never sees half a file;
* ``stats.jsonl`` is append-only; :func:`truncate_stats` drops the records a resumed run writes again;
* :class:`RunLock` marks a folder as in use by one training process (stale locks of dead processes
  are detected and replaced), so that two runs cannot interleave their outputs;
* :func:`weights_digest` fingerprints the weights a result was computed from;
* :func:`safe_name` turns a label into a file-name-safe folder or file name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .config import SkipdiffError

STATS_FILE = "stats.jsonl"
OPTIONS_FILE = "training_options.json"
LOCK_FILE = ".skipdiff.lock"
EVAL_LOCK_FILE = ".eval.lock"  # an evaluation's output folder, while it runs


# --------------------------------------------------------------------------------------------------
# JSON and JSONL
# --------------------------------------------------------------------------------------------------


def write_json_atomic(path: str | os.PathLike, payload, **dumps) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and a rename (``os.replace``).

    The temporary file is removed when writing fails (disk full, unwritable folder)."""
    dumps = {"indent": 2, "sort_keys": True, **dumps}
    write_text_atomic(path, json.dumps(payload, **dumps) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename: a reader sees
    the old file or the new one, never half of one; the temporary file is removed when writing fails."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_path(path) as tmp:`` write the file at ``tmp`` (same folder, hidden); it replaces ``path``
    when the block ends, and is removed when the block raises (a full disk, a missing permission, Ctrl-C), so
    ``path`` is the old file or the new one. Writers that pick a format by the suffix need it given (PNG)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Errors of a write that a user can act on (errno -> words); other OSErrors keep their own message.
_FULL = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
}
_DENIED = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}
_TEMPORARY_NAME = re.compile(r"^\.(.+)\.tmp\d+$")  # atomic_path's name for a file being written


def io_error_line(err: OSError, where: str | os.PathLike | None = None) -> str:
    """One line for an ``OSError`` of a command line. A full disk, an exceeded quota, a read-only file system or
    a missing permission names the file (its final name, not the temporary one; ``where`` when the error names
    none) and what to do; any other error keeps its own message."""
    failure = _FULL.get(err.errno) or _DENIED.get(err.errno)
    if failure is None:
        return str(err)
    target = where
    if err.filename:
        name = Path(os.fsdecode(err.filename))
        match = _TEMPORARY_NAME.match(name.name)
        target = name.with_name(match.group(1)) if match else name
    place = f" {str(target)!r}" if target is not None else ""
    if err.errno in _DENIED:
        return (
            f"{failure} on{place}: give yourself access to it or write somewhere else (--out), then run the "
            "command again; files written before are unchanged"
        )
    return (
        f"could not write{place}: {failure}; free space or write somewhere else (--out), then run the command "
        "again; files written before are unchanged and no temporary file is left"
    )


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """A JSON object from ``path``; a missing, truncated or non-object file is a ``ValueError`` naming it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ValueError(f"{what} {str(path)!r} does not exist") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON (truncated or corrupt?): {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{what} {str(path)!r} must hold a JSON object, got {type(value).__name__}")
    return value


def read_stats(path: str | os.PathLike) -> list[dict]:
    """Every record of a ``stats.jsonl`` (a last line cut off by a crash is ignored)."""
    records = []
    with open(path) as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise
    return records


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record (one line) to a JSONL file."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record, allow_nan=True) + "\n")


def truncate_stats(path: str | os.PathLike, last_step: int) -> int:
    """Drop the records past ``last_step`` (and a line cut off by a crash); returns how many were dropped.

    A run killed after its last checkpoint logged steps that the resumed run logs again. Rewritten to a
    temporary file and renamed."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and line.strip() and json.loads(line)["step"] <= last_step]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


def current_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: str | os.PathLike) -> None:
    """Give every file below ``folder`` the mode the umask gives a new file (0644 under 022, 0664 under
    002). safetensors creates its files 0600, whatever the umask: a run folder copied to a group's shared
    results folder could not be read by the group."""
    mode = 0o666 & ~current_umask()
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


# --------------------------------------------------------------------------------------------------
# Names and fingerprints
# --------------------------------------------------------------------------------------------------


def safe_name(text) -> str:
    """A file-name-safe form of ``text``: letters, digits and ``. _ + -``; other runs become one ``_``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("_") or "_"


WEIGHT_FILES = ("*.safetensors",)


def weights_digest(folder: str | os.PathLike, patterns: tuple[str, ...] = WEIGHT_FILES) -> str:
    """sha256 (hex, 16 digits) over the names and bytes of every weight file (``patterns``: ``*.safetensors``
    by default; pipelines from the Hub may also hold ``*.bin``) and ``config.json`` below ``folder``: it
    changes whenever the weights or the architecture do."""
    folder = Path(folder)
    weights = sorted({path for pattern in patterns for path in folder.rglob(pattern)})
    if not weights:
        raise ValueError(f"{str(folder)!r} holds no weights ({', '.join(patterns)})")
    files = sorted([*weights, *folder.rglob("config.json")])
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# A run's lock
# --------------------------------------------------------------------------------------------------


class RunLockedError(SkipdiffError):
    """Another live process is training into this folder."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder, held by one process for the length of a training run.

    The lock is a file (``.skipdiff.lock``) created with ``O_EXCL``, holding the owner's pid, host and
    start time. A lock whose process no longer exists on this host (killed, crashed) is stale: it is
    replaced, with a note. A live owner makes :meth:`acquire` raise :class:`RunLockedError` naming it.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        name: str = LOCK_FILE,
        holder: str = "training process",
        hint: str = "wait for it to finish or choose another --output_dir",
    ):
        self.path = Path(folder) / name
        self.holder, self.hint = holder, hint  # for the refusal: who holds the folder, what to do
        self.held = False
        self.replaced_stale: dict | None = None

    def owner(self) -> dict | None:
        """The lock file's content, or None when there is no lock."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"pid": None, "host": None, "corrupt": True}

    def acquire(self) -> RunLock:
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is None:
                    continue  # released meanwhile
                if self._is_stale(owner):
                    self.replaced_stale = owner
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunLockedError(self._refusal(owner)) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(mine, handle)
            self.held = True
            return self
        raise RunLockedError(f"could not take the lock {str(self.path)!r}")

    def check_free(self) -> None:
        """Raise :class:`RunLockedError` naming the owner when a live process holds the lock, without taking
        it (a stale lock counts as free): for a caller about to delete the folder, not to write into it."""
        owner = self.owner()
        if owner is not None and not self._is_stale(owner):
            raise RunLockedError(self._refusal(owner))

    def _refusal(self, owner: dict) -> str:
        return (
            f"{str(self.path.parent)!r} is in use by another {self.holder} (pid {owner.get('pid')} on "
            f"{owner.get('host')}); {self.hint}"
        )

    @staticmethod
    def _is_stale(owner: dict) -> bool:
        if owner.get("corrupt"):
            return True
        if owner.get("host") != socket.gethostname():
            return False  # another machine's process: cannot tell, so it counts as live
        pid = owner.get("pid")
        return not isinstance(pid, int) or not _process_alive(pid)

    def release(self) -> None:
        if self.held:
            owner = self.owner()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked(folder: str | os.PathLike, enabled: bool = True) -> Iterator[RunLock | None]:
    """``with locked(folder):`` holds the folder's :class:`RunLock` (a no-op when not ``enabled``)."""
    if not enabled:
        yield None
        return
    with RunLock(folder) as lock:
        yield lock
