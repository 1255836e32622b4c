"""The gateway's durable on-disk queue.

Layout under the spool folder::

    incoming/<StudyInstanceUID>/<SOPInstanceUID>.dcm   received, study still open
    processing/<job>/                                   study closed; job = <StudyUID>.<ns timestamp>
        instances/*.dcm  sr.dcm  state.json             state: attempts, next attempt, sent-to list
    done/<job>.json                                     success record (SR UID, destinations)
    failed/<job>.json (+ failed/<job>/ kept files)      failure record with the reason

Every received instance is written to a temporary file, fsync'ed, renamed into place and its
folder fsync'ed before the C-STORE is acknowledged, so an acknowledged instance survives a crash
or power loss. Closing a study is one ``rename`` (atomic). State files are replaced atomically.
After a restart, open studies in ``incoming/`` close after the time-out counted from their
newest file, and every job in ``processing/`` resumes where its state says.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it is on disk when this returns (tmp, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    durable_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


class Spool:
    """The queue's folders and the few atomic operations on them. Thread-safe."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.processing = self.root / "processing"
        self.done = self.root / "done"
        self.failed = self.root / "failed"
        for d in (self.incoming, self.processing, self.done, self.failed):
            d.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self._last_activity: dict[str, float] = {}
        for study in self.incoming.iterdir():
            if study.is_dir():
                mtimes = [f.stat().st_mtime for f in study.glob("*.dcm")]
                self._last_activity[study.name] = max(mtimes, default=study.stat().st_mtime)

    # -- receiving ---------------------------------------------------------------
    def store(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Durably store one received instance (returns after fsync)."""
        if not UID_RE.match(study_uid) or not UID_RE.match(sop_uid) or len(study_uid) > 64 or len(sop_uid) > 64:
            raise ValueError("Study/SOP Instance UID is not a valid DICOM UID")
        with self.lock:
            study_dir = self.incoming / study_uid
            new_dir = not study_dir.exists()
            study_dir.mkdir(parents=True, exist_ok=True)
            if new_dir:
                fsync_dir(self.incoming)
            path = study_dir / f"{sop_uid}.dcm"
            durable_write(path, data)
            self._last_activity[study_uid] = time.time()
        return path

    def open_studies(self) -> dict[str, float]:
        with self.lock:
            return dict(self._last_activity)

    def close_idle(self, timeout_s: float, now: float | None = None) -> list[Path]:
        """Move studies idle for ``timeout_s`` from incoming/ to processing/ (one rename each).

        The renames happen under the lock (a receiver never writes into a study being moved);
        the folders are fsync'ed after it, so receiving does not wait for this disk work.
        """
        now = time.time() if now is None else now
        closed = []
        with self.lock:
            for study_uid, last in list(self._last_activity.items()):
                if now - last < timeout_s:
                    continue
                src = self.incoming / study_uid
                del self._last_activity[study_uid]
                if not src.exists() or not any(src.glob("*.dcm")):
                    shutil.rmtree(src, ignore_errors=True)
                    continue
                job = self.processing / f"{study_uid}.{time.time_ns()}"
                job.mkdir()
                # the state first (advisory until a retry rewrites it durably; unreadable = a fresh state)
                (job / "state.json").write_text(json.dumps({"study_uid": study_uid, "attempts": 0, "next_attempt": 0.0,
                                                            "created": now, "sent": [], "last_error": None}))
                os.replace(src, job / "instances")
                closed.append(job)
        for job in closed:
            fsync_dir(job)
        if closed:
            fsync_dir(self.processing)
            fsync_dir(self.incoming)
        return closed

    # -- jobs --------------------------------------------------------------------
    def jobs(self) -> list[Path]:
        """Jobs waiting in processing/, oldest first."""
        return sorted((p for p in self.processing.iterdir() if p.is_dir()), key=lambda p: p.name.rsplit(".", 1)[-1])

    @staticmethod
    def state(job: Path) -> dict[str, Any]:
        return read_json(job / "state.json", default=None) or {"study_uid": job.name.rsplit(".", 1)[0],
                                                             "attempts": 0, "next_attempt": 0.0, "sent": [],
                                                             "created": time.time(), "last_error": None}

    @staticmethod
    def save_state(job: Path, state: dict[str, Any]) -> None:
        write_json(job / "state.json", state)

    def finish(self, job: Path, record: dict[str, Any], keep_instances: bool) -> Path:
        """Success: write done/<job>.json first (the commit point), then keep the SR beside it and
        drop the job folder. A crash after the record is written is completed by :meth:`cleanup`."""
        out = self.done / f"{job.name}.json"
        write_json(out, {**record, "keep_instances": keep_instances})
        self.cleanup(job)
        return out

    @staticmethod
    def is_empty(job: Path) -> bool:
        """A job folder with neither instances nor an SR: nothing to diagnose or send (a crash
        before the study moved in, or a broker message that carried nothing)."""
        return not (job / "instances").is_dir() and not (job / "sr.dcm").exists()

    def is_finished(self, job: Path) -> bool:
        return (self.done / f"{job.name}.json").exists()

    def cleanup(self, job: Path) -> None:
        """Move a finished job's SR (and instances, if kept) to done/ and remove its folder."""
        record = read_json(self.done / f"{job.name}.json", default={}) or {}
        if (job / "sr.dcm").exists():
            os.replace(job / "sr.dcm", self.done / f"{job.name}.sr.dcm")
        if record.get("keep_instances") and (job / "instances").exists():
            os.replace(job / "instances", self.done / f"{job.name}.instances")
        fsync_dir(self.done)
        shutil.rmtree(job, ignore_errors=True)
        fsync_dir(self.processing)

    def fail(self, job: Path, record: dict[str, Any]) -> Path:
        """Explicit failure: write failed/<job>.json and keep the job's files in failed/<job>/."""
        out = self.failed / f"{job.name}.json"
        write_json(out, record)
        os.replace(job, self.failed / job.name)
        fsync_dir(self.failed)
        fsync_dir(self.processing)
        return out

    def failures(self) -> list[dict[str, Any]]:
        """The failure records (dead letters of the local queue), oldest first."""
        out = []
        for f in sorted(self.failed.glob("*.json")):
            r = read_json(f, default={}) or {}
            out.append({"job": f.stem, "study": r.get("study", ""), "reason": r.get("reason", ""),
                        "attempts": r.get("attempts", 0), "time": r.get("time")})
        return out

    def retry_failed(self) -> int:
        """Put every failed job back into processing/ with a fresh state; returns how many."""
        moved = 0
        with self.lock:
            for record in sorted(self.failed.glob("*.json")):
                job = self.failed / record.stem
                if not job.is_dir():
                    record.unlink()
                    continue
                state = self.state(job)
                state.update(attempts=0, next_attempt=0.0, created=time.time(), last_error=None)
                write_json(job / "state.json", state)
                os.replace(job, self.processing / job.name)
                record.unlink()
                moved += 1
            fsync_dir(self.processing)
            fsync_dir(self.failed)
        return moved

    def summary(self) -> dict[str, int]:
        return {
            "open_studies": len(self.open_studies()),
            "processing": len(self.jobs()),
            "done": len(list(self.done.glob("*.json"))),
            "failed": len(list(self.failed.glob("*.json"))),
        }
