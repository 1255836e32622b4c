"""The gateway's local queue as a pipeline: each stage on its own threads, all stages busy at once.

::

    listener threads --fsync--> incoming/<study>/
    closer (1 thread)   idle study --one rename--> processing/<job>/
    reader (1 thread)   ready jobs, about batch_size images -> read + prepare (one batch ahead)
    feeder (1 thread)   a read batch -> diagnose(), several studies per call -> one SR build per
                        study submitted
    SR builds           sr_processes spawned processes (0: `workers` threads)
    senders (`workers`) SR bytes -> sr.dcm (fsync) -> each destination not yet done (C-STORE on an
                        association each sender keeps open) -> done/<job>.json

Stages hand jobs on in memory; the spool stays the only record of progress, so a crash anywhere
loses nothing acknowledged: after a restart each job in processing/ starts again from its files
(sr.dcm written: send it; otherwise read and diagnose again; SR UIDs come from the study and the
model, so a rebuilt SR is the same SR and the PACS keeps one copy). A job is claimed from the
moment the reader takes it until a sender settles it (done, failed, or waiting for a retry), so
each job is in one stage at a time and is sent by one sender. Back-pressure: at most
``3 * batch_size`` jobs are claimed at once (one batch being sent, one diagnosed, one read), and
with a longer queue the reader waits for room for a whole batch, so diagnose() calls stay batched
under load. The reader reads the next batch while the feeder diagnoses this one, so reading is off
the diagnosis's path.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hygeia.errors import InputError

from .listener import describe_error, study_tag
from .senders import CStoreLink

log = logging.getLogger("hygeia_pacs.gateway")

IDLE_RELEASE_S = 2.0  # a sender idle this long releases its association (the PACS need not keep it)


@dataclass
class _Read:
    """A claimed job whose instances were read, on its way to diagnose()."""

    job: Path
    state: dict[str, Any]
    datasets: list[Any]
    images: np.ndarray
    texts: list[str]
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """The stages of one :class:`~hygeia_pacs.gateway.Gateway` (its spool, claims, diagnoser, SR pool)."""

    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self.limit = max(3 * gw.config.batch_size, 2 * gw.config.workers)  # jobs claimed at once
        self.sends: queue.Queue[tuple[Path, dict[str, Any], Any, dict[str, float]] | None] = queue.Queue()
        self.reads: queue.Queue[list[_Read] | None] = queue.Queue(maxsize=1)  # one batch read ahead
        self._due: dict[str, float] = {}  # unclaimed job -> time of its next attempt (read from state.json once)
        self._threads: list[threading.Thread] = []

    def start(self) -> list[threading.Thread]:
        """Start the feeder and the senders; returns the senders (the gateway's ``workers``)."""
        senders = [threading.Thread(target=self._send_loop, name=f"hygeia-gateway-sender-{i}", daemon=True)
                   for i in range(self.gw.config.workers)]
        self._threads = [threading.Thread(target=self._close_loop, name="hygeia-gateway-closer", daemon=True),
                         threading.Thread(target=self._read_loop, name="hygeia-gateway-reader", daemon=True),
                         threading.Thread(target=self._feed_loop, name="hygeia-gateway-feeder", daemon=True),
                         *senders]
        for t in self._threads:
            t.start()
        return senders

    def stop(self, timeout: float) -> None:
        """After the gateway's stop event: each sender finishes the SR in hand; jobs still queued
        stay in processing/ (their claims were in memory only) for the next start."""
        for _ in range(self.gw.config.workers):
            self.sends.put(None)
        while True:  # the feeder: stop after the batch in hand (a batch read ahead stays in processing/)
            try:
                self.reads.put_nowait(None)
                break
            except queue.Full:
                try:
                    self.reads.get_nowait()
                except queue.Empty:
                    pass
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))

    # -- claims ------------------------------------------------------------------
    def _claim(self, job: Path) -> dict[str, Any] | None:
        gw = self.gw
        with gw._claim_lock:
            if job.name in gw._claimed:
                return None
            gw._claimed.add(job.name)
        self._due.pop(job.name, None)
        if not job.is_dir():  # finished meanwhile
            self._release(job)
            return None
        return gw.spool.state(job)

    def _release(self, job: Path, state: dict[str, Any] | None = None) -> None:
        if state is not None and job.is_dir():  # waiting for a retry
            self._due[job.name] = float(state.get("next_attempt", 0.0))
        with self.gw._claim_lock:
            self.gw._claimed.discard(job.name)
        self.gw._wake.set()  # room for the feeder

    def _settle(self, job: Path, state: dict[str, Any], exc: BaseException) -> None:
        """A job that cannot go on now: a failure record (bad input) or a retry later."""
        try:
            self.gw.retry_later(job, state, exc)
        except Exception as exc2:  # the spool cannot be written (disk full): keep it in memory, try later
            log.error("gateway: cannot record a retry: %s", describe_error(exc2))
            state["next_attempt"] = self.gw._clock() + self.gw.config.retry_max_s
        finally:
            self._release(job, state)

    def _ready(self, now: float) -> list[Path]:
        """Unclaimed jobs whose next attempt is due, oldest first."""
        gw = self.gw
        with gw._claim_lock:
            claimed = set(gw._claimed)
        with gw.spool.lock:  # a closing pass is seen whole: the studies it closed share a batch
            jobs = gw.spool.jobs()
        for gone in set(self._due) - {j.name for j in jobs}:
            self._due.pop(gone, None)
        out = []
        for job in jobs:
            if job.name in claimed:
                continue
            if job.name not in self._due:
                self._due[job.name] = float(gw.spool.state(job).get("next_attempt", 0.0))
            if self._due[job.name] <= now:
                out.append(job)
        return out

    # -- the closer: studies idle for study_timeout_s become jobs --------------------
    def _close_loop(self) -> None:
        gw = self.gw
        while not gw._stop.wait(gw.config.poll_s):
            try:
                for job in gw.spool.close_idle(gw.config.study_timeout_s, now=gw._clock()):
                    log.info("%s closed: %d instance(s)", study_tag(job.name.rsplit(".", 1)[0]),
                             len(list((job / "instances").glob("*.dcm"))))
                    gw._wake.set()  # work for the feeder
            except Exception as exc:  # never let the closer die (a full disk): one line, and go on
                log.error("gateway closer step failed: %s", describe_error(exc))

    # -- the reader: claim and read; the feeder: diagnose, submit the SR builds ------------
    def _read_loop(self) -> None:
        gw = self.gw
        while not gw._stop.is_set():
            try:
                busy = self.feed()
            except Exception as exc:  # never let the reader die: one line, and go on
                log.error("gateway reader step failed: %s", describe_error(exc))
                busy = False
            if not busy:
                gw._wake.wait(gw.config.poll_s)
                gw._wake.clear()

    def _feed_loop(self) -> None:
        while (reads := self.reads.get()) is not None:
            try:
                self._diagnose(reads)
            except Exception as exc:  # never let the feeder die: one line (the jobs stay in processing/)
                log.error("gateway feeder step failed: %s", describe_error(exc))

    def feed(self) -> bool:
        """Claim ready jobs (about ``batch_size`` images), read them and hand them to the feeder
        (waiting while it still has a batch read ahead); True if it took any."""
        gw, cfg = self.gw, self.gw.config
        now = gw._clock()
        with gw._claim_lock:
            free = self.limit - len(gw._claimed)
        ready = self._ready(now) if free > 0 else []
        if not ready or (free < min(cfg.batch_size, len(ready)) and free < self.limit):
            return False  # nothing due, or not yet room for a whole batch
        batch, images = [], 0
        for job in ready[:free]:
            state = self._claim(job)
            if state is None:
                continue
            if not (job / "instances").is_dir() or (job / "sr.dcm").exists() or gw.spool.is_finished(job):
                self.sends.put((job, state, None, {}))  # nothing to diagnose: the sender resumes it
                continue
            batch.append((job, state))
            images += len(list((job / "instances").glob("*.dcm")))
            if images >= cfg.batch_size:
                break
        reads = [r for r in (self._read(job, state) for job, state in batch) if r is not None]
        while reads and not gw._stop.is_set():
            try:
                self.reads.put(reads, timeout=cfg.poll_s)
                break
            except queue.Full:
                continue
        return True

    def _read(self, job: Path, state: dict[str, Any]) -> _Read | None:
        t0 = time.perf_counter()
        try:
            datasets, images, texts = self.gw.read_study(job)
        except Exception as exc:  # an unreadable study fails (bad input) or waits (disk)
            self._settle(job, state, exc)
            return None
        return _Read(job, state, datasets, images, texts, {"read_s": time.perf_counter() - t0})

    def _diagnose(self, reads: list[_Read]) -> None:
        """One diagnose() pass over the studies' images together, then one SR build per study."""
        from concurrent.futures.process import BrokenProcessPool

        gw = self.gw
        t0 = time.perf_counter()
        try:
            results = gw.diagnose_studies([(r.images, r.texts) for r in reads])
        except Exception as exc:
            if isinstance(exc, InputError) and len(reads) > 1:  # which study is bad input? each alone
                for r in reads:
                    self._diagnose([r])
                return
            for r in reads:
                self._settle(r.job, r.state, exc)  # bad input fails; Triton down retries
            return
        took, n = time.perf_counter() - t0, sum(len(r.images) for r in reads)
        for r, diagnoses in zip(reads, results):
            r.timings.update(diagnose_s=took * len(r.images) / n, batch_images=n)
            try:
                future = gw.submit_sr(diagnoses, r.datasets)
            except Exception as exc:  # an SR process died (new pool), or stopping: this study later
                if isinstance(exc, BrokenProcessPool):
                    gw._replace_sr_pool(gw._sr_pool)
                self._settle(r.job, r.state, exc)
                continue
            self.sends.put((r.job, r.state, future, r.timings))

    # -- the senders ---------------------------------------------------------------
    def _send_loop(self) -> None:
        gw = self.gw
        link = CStoreLink(gw.config.cstore, gw.config.ae_title) if gw.config.cstore is not None else None
        try:
            while True:
                try:
                    item = self.sends.get(timeout=IDLE_RELEASE_S)
                except queue.Empty:
                    if link is not None:
                        link.close()
                    continue
                if item is None:
                    return
                job, state, future, timings = item
                if gw._stop.is_set():  # stopping: the job stays in processing/ for the next start
                    self._release(job)
                    continue
                try:
                    gw.deliver(job, state, future, timings, link)
                except Exception as exc:  # never let a sender die: one line, and try this job again later
                    log.error("gateway sender step failed: %s", describe_error(exc))
                    state["next_attempt"] = gw._clock() + gw.config.retry_initial_s
                finally:
                    self._release(job, state)
        finally:
            if link is not None:
                link.close()
