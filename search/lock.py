"""One driver per search: an exclusive lock on the search folder while ``adaptune search`` runs.

Two drivers on one folder would both restore Tune's state, ask Optuna for trials and log to one
MLflow parent run. :class:`SearchLock` lets the first in and refuses others with a one-line
:class:`ConfigError` naming the running driver (pid, host, start time, command) and what to do:
wait for it, or stop it (``kill PID`` on its host) and continue with ``--resume``.

Two ways to hold it (``mode``; ``auto`` = ``heartbeat`` for URIs, else ``flock``; the variable
``ADAPTUNE_DRIVER_LOCK=flock|heartbeat`` overrides ``auto``):

- ``flock``: an OS lock (``fcntl.flock``) on ``<folder>/.driver.lock``, a file that also holds
  the holder's record as JSON. The kernel drops it when the process dies (SIGKILL, crash,
  reboot), so a dead driver never blocks; the descriptor is not inherited by the processes Ray
  starts, so none of them keeps the lock after the driver's death.
- ``heartbeat``, for storage file locks do not reach (``s3://``, ``gs://``, NFS without locks):
  the record in ``<folder>/.driver.heartbeat``, written through ``pyarrow.fs`` (as Ray writes
  its storage) and rewritten every ``interval`` s (default 10) by a daemon thread. A record not
  rewritten for ``timeout`` s (default 60) belongs to a dead driver and is taken over. Ages are
  measured from the record's own time stamp: hosts' clocks must agree to well within
  ``timeout``. Drivers starting together both write, wait ``settle`` s (default 1) and read
  again: the one whose record is there holds the lock.

Releasing removes the record, and the folders the lock created if still empty, so a search
refused before it wrote anything leaves nothing behind.

Example:
    >>> with SearchLock("/data/runs/ray/quickstart"):  # doctest: +SKIP
    ...     tuner.fit()
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from adaptune.trainables.errors import ConfigError

try:
    import fcntl
except ImportError:  # no flock on this OS: heartbeat only
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".driver.lock"
HEARTBEAT_FILE = ".driver.heartbeat"
LOCK_FILES = (LOCK_FILE, HEARTBEAT_FILE)  # the lock's own files, no part of a search's state
MODE_ENV = "ADAPTUNE_DRIVER_LOCK"
Mode = Literal["auto", "flock", "heartbeat"]


class SearchLock:
    """An exclusive lock on one search folder; a context manager (rules: the module docstring).

    Args:
        location: the search folder, ``<storage_path>/<name>``: a local path or a URI.
        mode: ``flock``, ``heartbeat`` or ``auto``.
        command: the command line a refused driver is shown (default: this process's).
        timeout: heartbeat: seconds without a refresh after which the holder counts as dead.
        interval: heartbeat: seconds between refreshes.
        settle: heartbeat: seconds between writing a record and checking it is still there.

    Raises:
        ConfigError: a mode that cannot work for ``location``; on :meth:`acquire`, a live
            driver holding the folder.
    """

    def __init__(self, location: str, *, mode: Mode = "auto", command: str | None = None,
                 timeout: float = 60.0, interval: float = 10.0, settle: float = 1.0) -> None:
        is_uri = "://" in location
        if mode == "auto":
            mode = os.environ.get(MODE_ENV) or (  # type: ignore[assignment]
                "heartbeat" if is_uri or fcntl is None else "flock")
        if mode not in ("flock", "heartbeat") or (mode == "flock" and (is_uri or fcntl is None)):
            raise ConfigError(f"{MODE_ENV}: must be 'heartbeat', or 'flock' for a local folder "
                              f"on an OS with file locks; got {mode!r} for {location}")
        self.location = location.rstrip("/") if is_uri else str(Path(location).resolve())
        self.mode, self.timeout, self.interval, self.settle = mode, timeout, interval, settle
        self.command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.record: dict[str, Any] = {}  # the holder's, while this lock is held
        self._fs: Any = None  # pyarrow.fs.FileSystem of the location; _path: the path in it
        self._path, self._fd = "", -1
        self._created: list[str] = []  # folders this lock made, deepest first
        self._stop, self._thread = threading.Event(), threading.Thread()

    def __enter__(self) -> SearchLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock now, or raise :class:`ConfigError` naming the driver that holds it."""
        import pyarrow.fs

        self._fs, self._path = pyarrow.fs.FileSystem.from_uri(self.location)
        self._created, path = [], self._path
        while self._fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
            self._created.append(path)
            if posixpath.dirname(path) in (path, ""):
                break
            path = posixpath.dirname(path)
        self._fs.create_dir(self._path, recursive=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": uuid.uuid4().hex}
        try:
            (self._take_flock if self.mode == "flock" else self._take_heartbeat)(record)
        except BaseException:
            self._remove_created()
            raise
        self.record = record

    def release(self) -> None:
        """Give the lock up and remove its record; does nothing when not held."""
        if not self.record:
            return
        if self.mode == "flock":
            # unlinked while still locked: a driver that opened this inode sees it is gone
            with contextlib.suppress(OSError):
                os.unlink(f"{self._path}/{LOCK_FILE}")
            os.close(self._fd)  # closing the only descriptor releases the flock
        else:
            self._stop.set()
            self._thread.join()
            with contextlib.suppress(OSError):
                if (self._read_heartbeat() or {}).get("token") == self.record["token"]:
                    self._fs.delete_file(f"{self._path}/{HEARTBEAT_FILE}")
        self.record = {}
        self._remove_created()

    def _take_flock(self, record: dict[str, Any]) -> None:
        path = f"{self._path}/{LOCK_FILE}"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inheritable (PEP 446)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_json(functools.partial(os.pread, fd, 1 << 16, 0))
                os.close(fd)
                raise ConfigError(self._refusal(holder)) from None
            except OSError as err:  # ENOLCK: a network folder without locks
                os.close(fd)
                raise ConfigError(f"{path}: file locks do not work here ({err.strerror}); "
                                  f"set {MODE_ENV}=heartbeat") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)  # locked a file its holder unlinked on release: open the new one
        os.ftruncate(fd, 0)  # a killed holder's record may still be there
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def _read_heartbeat(self) -> dict[str, Any] | None:
        import pyarrow.fs

        path = f"{self._path}/{HEARTBEAT_FILE}"
        info = self._fs.get_file_info(path)
        if info.type == pyarrow.fs.FileType.NotFound:
            return None

        def read() -> bytes:
            with self._fs.open_input_stream(path) as f:
                return f.read()  # type: ignore[no-any-return]

        holder = _read_json(read)
        if "beat" not in holder and info.mtime is not None:  # its writer died mid-write
            holder["beat"] = info.mtime.timestamp()
        return holder

    def _write_heartbeat(self, record: dict[str, Any]) -> None:
        """Write aside, then move over the record: a reader never sees it half-written (a
        rename on local disks and NFS; object stores' puts are whole anyway)."""
        path = f"{self._path}/{HEARTBEAT_FILE}"
        aside = f"{path}.{record['token']}"
        with self._fs.open_output_stream(aside) as f:
            f.write(json.dumps(record | {"beat": time.time()}).encode())
        self._fs.move(aside, path)

    def _take_heartbeat(self, record: dict[str, Any]) -> None:
        holder = self._read_heartbeat()
        if holder is not None and time.time() - float(holder.get("beat", 0)) < self.timeout:
            raise ConfigError(self._refusal(holder))
        self._write_heartbeat(record)
        time.sleep(self.settle)
        holder = self._read_heartbeat() or {}
        if holder.get("token") != record["token"]:  # another driver wrote after this one
            raise ConfigError(self._refusal(holder))
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, args=(record,), daemon=True,
                                        name="adaptune-driver-heartbeat")
        self._thread.start()

    def _beat(self, record: dict[str, Any]) -> None:
        while not self._stop.wait(self.interval):
            try:
                holder = self._read_heartbeat() or record
                if holder.get("token") != record["token"]:
                    print(f"adaptune: warning: this driver was silent for over "
                          f"{self.timeout:.0f}s and lost its lock on {self.location} to pid "
                          f"{holder.get('pid')} on {holder.get('host')}", file=sys.stderr)
                    return
                self._write_heartbeat(record)
            except OSError:  # storage briefly unreachable: the next beat tries again
                continue

    def _refusal(self, holder: dict[str, Any]) -> str:
        if "pid" not in holder:
            return (f"{self.location}: another adaptune search holds this folder (its record "
                    "is unreadable); wait for it to end, or stop it and continue with --resume")
        pid, host = holder["pid"], holder.get("host", "?")
        command = " ".join(str(holder.get("command", "")).split())[:200]
        beat = ""
        if self.mode == "heartbeat":
            age = max(0.0, time.time() - float(holder.get("beat", 0)))
            beat = f", last heartbeat {age:.0f}s ago (dead after {self.timeout:.0f}s)"
        return (f"{self.location}: another adaptune search is running here: pid {pid} on "
                f"{host}, started {holder.get('started', '?')} ({command}){beat}; wait for it "
                f"to end, or stop it (`kill {pid}` on {host}) and continue with --resume")

    def _remove_created(self) -> None:
        import pyarrow.fs

        for folder in self._created:  # deepest first; stops at the first one not empty
            try:
                if self._fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True)):
                    break
                self._fs.delete_dir(folder)
            except OSError:
                break
        self._created = []


def _read_json(read: Callable[[], bytes]) -> dict[str, Any]:
    """A record being written reads empty or cut: try again for up to a second."""
    for _ in range(20):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(read().decode("utf-8"))
            if isinstance(data, dict):
                return data
        time.sleep(0.05)
    return {}
