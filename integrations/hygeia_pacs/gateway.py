"""The Hygeia PACS gateway: C-STORE SCP -> durable queue -> diagnoser -> TID 1500 SR -> PACS.

- Associations are accepted only from the configured calling AE titles (others are rejected at
  association time, reason "calling AE title not recognised").
- Each received instance is checked (decodable data set, allowed modality, pixel data present,
  one frame, pixels decodable) and written to disk with fsync BEFORE the C-STORE response is
  sent; a bad instance gets a failure status with an Error Comment and the gateway keeps running.
- Instances are grouped by Study Instance UID; a study closes ``study_timeout_s`` after its last
  instance, then the diagnoser runs (in-process, or remotely: any object with ``.diagnose``),
  one SR is built for the study and sent by C-STORE and/or STOW-RS.
- PACS or Triton down: retried with exponential back-off; nothing is dropped. Every study ends
  with its SR stored (``done/<job>.json``) or an explicit failure record (``failed/<job>.json``).

Logs never contain patient data: a study is named by a short hash of its UID.
"""
from __future__ import annotations

import functools
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hygeia.errors import InputError

from .config import GatewayConfig
from .diagnosers import Diagnosers, diagnose_options  # noqa: F401  (diagnose_options: public here too)
from .senders import PermanentError, send_cstore, send_stow
from .listener import Listener, describe_error, study_tag  # noqa: F401  (study_tag: public here too)
from .reports import _warm_sr_process, encode_sr, report_uids
from .spool import Spool, durable_write

log = logging.getLogger("hygeia_pacs.gateway")

def clinical_text(ds: Any) -> str:
    """Clinical history carried by an image, if any (Additional Patient History, Reason for Study)."""
    parts = [str(getattr(ds, kw, "") or "").strip() for kw in
             ("AdditionalPatientHistory", "ReasonForTheRequestedProcedure", "ReasonForStudy")]
    return " ".join(p for p in parts if p)


class Gateway(Listener):
    """Runs the SCP and the worker. ``diagnoser``: any object with ``diagnose(images, texts)`` and
    ``input_size``; None builds it from the config (local plugin or Triton)."""

    def __init__(self, config: GatewayConfig, diagnoser: Any | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self._diagnosers = Diagnosers(config, diagnoser)
        self._clock = clock
        self._server: Any = None
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._claim_lock = threading.Lock()
        self._claimed: set[str] = set()  # jobs a worker is processing now
        self._diagnose_lock = threading.Lock()  # plugins need not be thread-safe: one diagnose at a time
        self._sr_pool: Any = None  # concurrent.futures.ProcessPoolExecutor when config.sr_processes > 0
        self._sr_threads: Any = None  # a ThreadPoolExecutor building SRs when there are no SR processes
        self._pipeline: Any = None  # the local queue's stages (pipeline.Pipeline); None with a broker
        self.counters = {"accepted": 0, "rejected": 0, "sent": 0, "failed": 0, "retries": 0, "diagnosed_locally": 0}
        self._counter_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "Gateway":
        """Start listening and processing (returns at once; see :meth:`stop`)."""
        if not self.config.server and self.config.consume:
            self.diagnoser()  # a local plugin that cannot load is a configuration error: fail now
        if self.config.receive:
            self._start_listener()
        self._stop.clear()
        if self.config.sr_processes:
            self._start_sr_pool()
        if not self.config.broker:
            from concurrent.futures import ThreadPoolExecutor

            from .pipeline import Pipeline

            if not self.config.sr_processes:
                self._sr_threads = ThreadPoolExecutor(self.config.workers, thread_name_prefix="hygeia-gateway-sr")
            self._pipeline = Pipeline(self)
            self._workers = self._pipeline.start()
            return self
        from . import distributed

        distributed.clear_work(self)
        self._workers = [threading.Thread(target=functools.partial(distributed.work_loop, self),
                                          name=f"hygeia-gateway-worker-{i}", daemon=True)
                         for i in range(self.config.workers)]
        for w in self._workers:
            w.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let the current job steps finish, stop the workers."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        self._wake.set()
        end = time.monotonic() + timeout
        if self._pipeline is not None:
            self._pipeline.stop(timeout)
            self._pipeline = None
        for w in self._workers:
            w.join(max(0.0, end - time.monotonic()))
        self._workers = []
        for attr in ("_sr_pool", "_sr_threads"):
            if getattr(self, attr) is not None:
                getattr(self, attr).shutdown(wait=True, cancel_futures=True)
                setattr(self, attr, None)

    def _start_sr_pool(self) -> None:
        """Spawn the SR processes (spawn, not fork: this process has threads and maybe torch)."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, wait

        n = self.config.sr_processes
        self._sr_pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_warm_sr_process)
        wait([self._sr_pool.submit(time.sleep, 0) for _ in range(n)])  # started and warm before the first study

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def diagnoser(self) -> Any:
        """The configured diagnoser, built on first use (a remote one may fail now and succeed later;
        see :mod:`hygeia_pacs.diagnosers` for the in-process fallback)."""
        return self._diagnosers.primary()

    # -- receiving -----------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[key] += n

    # -- processing ----------------------------------------------------------------
    def process(self, job: Path, state: dict[str, Any]) -> int:
        """One attempt at a job: build the SR here (once), send it to every destination not yet done.
        The broker's workers call this; the local queue runs the same steps as a pipeline."""
        return self.deliver(job, state)

    def deliver(self, job: Path, state: dict[str, Any], sr: Any = None, timings: dict[str, float] | None = None,
                link: Any = None) -> int:
        """Write the job's SR (``sr``: a Future of :func:`encode_sr`'s result; None: build it now)
        unless an earlier attempt did, send it to every destination not yet done (C-STORE over
        ``link``, a :class:`CStoreLink`, when given) and write the record. Returns 1 when the job
        ended (done or failed), 0 when it waits for a retry or had nothing to do."""
        tag = study_tag(state.get("study_uid", job.name))
        if self.spool.is_finished(job):  # a crash after the done record, before the clean-up
            self.spool.cleanup(job)
            return 0
        if self.spool.is_empty(job):
            with self.spool.lock:  # a study being closed now has its folder a moment before its instances
                empty = self.spool.is_empty(job)
                if empty:  # a crash before the study moved in
                    shutil.rmtree(job, ignore_errors=True)
            if empty:
                log.warning("%s: empty job folder left by a crash, removed", tag)
                return 0
        started = self._clock()
        timings = {} if timings is None else timings
        try:
            sr_path, info = job / "sr.dcm", {}
            if not sr_path.exists():
                data, info = self.make_sr(job, timings) if sr is None else self._sr_result(sr, timings)
                t0 = time.perf_counter()
                durable_write(sr_path, data)
                timings["sr_write_s"] = time.perf_counter() - t0
                log.info("%s: SR built (%d finding group(s))", tag, info["groups"])
            t0 = time.perf_counter()
            self._send_all(job, state, sr_path, link, tag)
            timings["send_s"] = time.perf_counter() - t0
        except (InputError, PermanentError) as exc:
            return self._fail(job, state, tag, f"{type(exc).__name__}: {exc}", state["attempts"] + 1)
        except Exception as exc:  # PACS/Triton down, network: retry with back-off
            return self.retry_later(job, state, exc, started)
        try:
            self._finish(job, state, tag, sr_path, info, timings)
        except OSError as exc:  # the record cannot be written: later (is_finished covers a record written)
            return self.retry_later(job, state, exc, started)
        return 1

    def _sr_result(self, future: Any, timings: dict[str, float]) -> tuple[bytes, dict[str, Any]]:
        from concurrent.futures.process import BrokenProcessPool

        t0, pool = time.perf_counter(), getattr(future, "sr_pool", None)
        try:
            data, info = future.result()
        except BrokenProcessPool:
            self._replace_sr_pool(pool)
            raise
        timings["sr_wait_s"] = time.perf_counter() - t0
        timings["sr_s"] = info.pop("build_s", 0.0)
        return data, info

    def _send_all(self, job: Path, state: dict[str, Any], sr_path: Path, link: Any, tag: str) -> None:
        import pydicom

        for name in ("cstore", "stow"):
            if name in state["sent"] or getattr(self.config, name) is None:
                continue
            if name == "cstore" and link is not None:
                link.send(sr_path)  # the stored bytes as they are, on the kept association
            elif name == "cstore":
                send_cstore(sr_path, self.config.cstore, self.config.ae_title)
            else:
                send_stow(pydicom.dcmread(sr_path), self.config.stow)
            state["sent"].append(name)
            if len(state["sent"]) < len(self._destinations()):  # the done record covers the last one
                self.spool.save_state(job, state)
            log.info("%s: SR sent by %s", tag, name)

    def _destinations(self) -> list[str]:
        return [n for n in ("cstore", "stow") if getattr(self.config, n) is not None]

    def _finish(self, job: Path, state: dict[str, Any], tag: str, sr_path: Path, info: dict[str, Any],
                timings: dict[str, float]) -> None:
        if not info:  # built by an earlier attempt: read the UIDs back
            import pydicom

            ds = pydicom.dcmread(sr_path, specific_tags=["SOPInstanceUID", "SeriesInstanceUID"])
            info = {"sop_instance_uid": str(ds.SOPInstanceUID), "series_instance_uid": str(ds.SeriesInstanceUID)}
        record = {"study": tag, "study_uid": state.get("study_uid"), "status": "done",
                  "sr_sop_instance_uid": info["sop_instance_uid"],
                  "sr_series_instance_uid": info["series_instance_uid"], "sent": state["sent"],
                  "attempts": state["attempts"] + 1, "time": self._clock(),
                  "timings_s": {k: round(v, 4) for k, v in timings.items()}}
        self.spool.finish(job, record, keep_instances=self.config.keep_instances)
        self._count("sent")
        log.info("%s: done (SR stored in the PACS)", tag)

    def _fail(self, job: Path, state: dict[str, Any], tag: str, reason: str, attempts: int) -> int:
        self._count("failed")
        record = {"study": tag, "study_uid": state.get("study_uid"), "status": "failed", "reason": reason,
                  "attempts": attempts, "sent": state["sent"], "time": self._clock()}
        self.spool.fail(job, record)
        log.error("%s: FAILED (%s); failure record in %s", tag, reason, self.spool.failed)  # its name holds the UID
        return 1

    def retry_later(self, job: Path, state: dict[str, Any], exc: BaseException, started: float | None = None) -> int:
        """A retryable failure: back off exponentially, or write the failure record after give_up_after_s."""
        if isinstance(exc, (InputError, PermanentError)):
            return self._fail(job, state, study_tag(state.get("study_uid", job.name)),
                              f"{type(exc).__name__}: {exc}", state["attempts"] + 1)
        tag = study_tag(state.get("study_uid", job.name))
        state["attempts"] += 1
        delay = min(self.config.retry_max_s, self.config.retry_initial_s * 2 ** (state["attempts"] - 1))
        state["next_attempt"] = self._clock() + delay
        state["last_error"] = describe_error(exc)  # no file names: spool paths hold UIDs
        self._count("retries")
        give_up = self.config.give_up_after_s
        started = self._clock() if started is None else started
        if give_up is not None and self._clock() - state.get("created", started) > give_up:
            return self._fail(job, state, tag, f"gave up after {state['attempts']} attempts over {give_up:g} s; "
                              f"last error: {state['last_error']}", state["attempts"])
        self.spool.save_state(job, state)
        log.warning("%s: attempt %d failed (%s); retrying in %.1f s", tag, state["attempts"],
                    state["last_error"], delay)
        return 0

    # -- reading, diagnosing, building -------------------------------------------
    def read_study(self, job: Path) -> tuple[list[Any], np.ndarray, list[str]]:
        """The job's instances (sorted by series and instance number), prepared images, clinical texts."""
        import pydicom

        from hygeia.data.io import load_dataset, prepare_image

        files = sorted((job / "instances").glob("*.dcm"))
        if not files:
            raise InputError("study", "at least one received image", got="none")
        datasets = [pydicom.dcmread(f) for f in files]
        datasets.sort(key=lambda d: (str(getattr(d, "SeriesInstanceUID", "")), int(getattr(d, "InstanceNumber", 0) or 0)))
        size = tuple(getattr(self._diagnosers.current(), "input_size", (64, 64)))
        images = np.stack([prepare_image(load_dataset(d).pixels, size=size) for d in datasets])
        for d in datasets:  # the SR needs headers only: no pixels to keep, pickle or copy
            if "PixelData" in d:
                del d.PixelData
        return datasets, images, [clinical_text(d) for d in datasets]

    def diagnose_studies(self, studies: list[tuple[np.ndarray, list[str]]]) -> list[list[Any]]:
        """One Diagnosis list per study; the images of all of them go through ``diagnose()`` together,
        ``batch_size`` at a time (calls never overlap: plugins need not be thread-safe)."""
        images = np.concatenate([im for im, _ in studies])
        texts = [t for _, ts in studies for t in ts]
        texts_arg = texts if any(texts) else None
        with self._diagnose_lock:
            out, on_fallback = self._diagnosers.diagnose(images, texts_arg, max(1, self.config.batch_size))
        if on_fallback:
            self._count("diagnosed_locally", len(images))
        if len(out) != len(images):
            raise InputError("diagnoser output", f"one Diagnosis per image ({len(images)})", got=len(out))
        ends = np.cumsum([len(im) for im, _ in studies])
        return [out[e - len(im):e] for (im, _), e in zip(studies, ends)]

    def submit_sr(self, diagnoses: list[Any], datasets: list[Any]) -> Any:
        """Start building the study's SR (SR processes, or a thread); returns a Future of (bytes, info)."""
        uids = report_uids(datasets, diagnoses[0].model)
        pool = self._sr_pool if self._sr_pool is not None else self._sr_threads
        future = pool.submit(encode_sr, diagnoses, datasets, **uids)
        future.sr_pool = pool  # the pool to replace if this build finds its process dead
        return future

    def make_sr(self, job: Path, timings: dict[str, float] | None = None) -> tuple[bytes, dict[str, Any]]:
        """Read the study's instances, run the diagnoser, build and encode one TID 1500 SR
        (:func:`encode_sr`, in an SR process when ``sr_processes`` > 0)."""
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        datasets, images, texts = self.read_study(job)
        timings["read_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        (diagnoses,) = self.diagnose_studies([(images, texts)])
        timings["diagnose_s"] = time.perf_counter() - t0
        if self._sr_pool is None:
            data, info = encode_sr(diagnoses, datasets, **report_uids(datasets, diagnoses[0].model))
            timings["sr_s"] = info.pop("build_s", 0.0)
            return data, info
        from concurrent.futures.process import BrokenProcessPool

        pool = self._sr_pool
        try:
            future = self.submit_sr(diagnoses, datasets)
        except BrokenProcessPool:  # known dead already
            self._replace_sr_pool(pool)
            raise
        return self._sr_result(future, timings)

    def _replace_sr_pool(self, pool: Any) -> None:
        """An SR process died (killed, out of memory): one caller replaces the pool, the others find it replaced."""
        with self._claim_lock:
            if self._sr_pool is pool and pool is not None:
                log.error("an SR process died; restarting the SR processes")
                pool.shutdown(wait=False, cancel_futures=True)
                self._start_sr_pool()

    # -- status --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._counter_lock:
            counters = dict(self.counters)
        return {**self.spool.summary(), **counters}

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no study is open or in processing (tests, benchmarks)."""
        end = time.time() + timeout
        while time.time() < end:
            s = self.spool.summary()
            if s["open_studies"] == 0 and s["processing"] == 0:
                return True
            time.sleep(0.05)
        return False
