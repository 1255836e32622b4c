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
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hygeia.errors import InputError

from .config import GatewayConfig
from .senders import PermanentError, send_cstore, send_stow
from .listener import Listener, study_tag  # noqa: F401  (study_tag: public here too)
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
        self._diagnoser = diagnoser
        self._clock = clock
        self._server: Any = None
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._claim_lock = threading.Lock()
        self._claimed: set[str] = set()  # jobs a worker is processing now
        self._diagnose_lock = threading.Lock()  # plugins need not be thread-safe: one diagnose at a time
        self._sr_pool: Any = None  # concurrent.futures.ProcessPoolExecutor when config.sr_processes > 0
        self.counters = {"accepted": 0, "rejected": 0, "sent": 0, "failed": 0, "retries": 0}
        self._counter_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "Gateway":
        """Start listening and processing (returns at once; see :meth:`stop`)."""
        if self._diagnoser is None and not self.config.server and self.config.consume:
            self.diagnoser()  # a local plugin that cannot load is a configuration error: fail now
        if self.config.receive:
            self._start_listener()
        self._stop.clear()
        if self.config.sr_processes:
            self._start_sr_pool()
        target = self._work_loop
        if self.config.broker:
            from . import distributed

            distributed.clear_work(self)
            target = functools.partial(distributed.work_loop, self)
        self._workers = [threading.Thread(target=target, name=f"hygeia-gateway-worker-{i}", daemon=True)
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
        for w in self._workers:
            w.join(max(0.0, end - time.monotonic()))
        self._workers = []
        if self._sr_pool is not None:
            self._sr_pool.shutdown(wait=True, cancel_futures=True)
            self._sr_pool = None

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
        """The diagnoser, built on first use (a remote one may fail now and succeed later)."""
        if self._diagnoser is None:
            from hygeia.plugins import get_registry

            name = self.config.diagnoser or get_registry().default_name("diagnoser")
            if self.config.server:
                from hygeia.serving import connect

                self._diagnoser = connect("diagnoser", name, self.config.server)
            else:
                self._diagnoser = get_registry().create("diagnoser", name)
        return self._diagnoser

    # -- receiving -----------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[key] += n

    # -- processing ----------------------------------------------------------------
    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_pending()
            except Exception:  # never let the worker die: log and go on
                log.exception("gateway worker step failed")
            self._wake.wait(self.config.poll_s)
            self._wake.clear()

    def run_pending(self) -> int:
        """Close idle studies and process every job that is due; returns how many jobs finished.

        Several workers may call this at once: each job is claimed by one of them at a time.
        """
        now = self._clock()
        for job in self.spool.close_idle(self.config.study_timeout_s, now=now):
            log.info("%s closed: %d instance(s)", study_tag(job.name.rsplit(".", 1)[0]),
                     len(list((job / "instances").glob("*.dcm"))))
        finished = 0
        for job in self.spool.jobs():
            if self._stop.is_set():
                break
            with self._claim_lock:
                if job.name in self._claimed:
                    continue
                self._claimed.add(job.name)
            try:
                if not job.is_dir():  # finished by another worker since the listing
                    continue
                state = self.spool.state(job)
                if state.get("next_attempt", 0.0) > self._clock():
                    continue
                finished += self.process(job, state)
                self._wake.set()  # a job left the queue: idle workers look again
            finally:
                with self._claim_lock:
                    self._claimed.discard(job.name)
        return finished

    def process(self, job: Path, state: dict[str, Any]) -> int:
        """One attempt at a job: build the SR (once), send it to every destination not yet done."""
        tag = study_tag(state.get("study_uid", job.name))
        if self.spool.is_finished(job):  # a crash after the done record, before the clean-up
            self.spool.cleanup(job)
            return 0
        if not (job / "instances").is_dir():
            if (job / "sr.dcm").exists():
                pass  # instances dropped after a previous attempt built the SR: keep sending
            else:  # a crash between creating the job folder and moving the study into it
                log.warning("%s: empty job folder left by a crash, removed", tag)
                import shutil

                shutil.rmtree(job, ignore_errors=True)
                return 0
        started = self._clock()
        timings: dict[str, float] = {}
        try:
            import pydicom

            sr_path = job / "sr.dcm"
            sr_ds: Any = None
            info: dict[str, Any] = {}
            if not sr_path.exists():
                data, info = self.make_sr(job, timings)
                t0 = time.perf_counter()
                durable_write(sr_path, data)
                timings["sr_s"] += time.perf_counter() - t0  # build + encode + durable write
                log.info("%s: SR built (%d finding group(s))", tag, info["groups"])
            t0 = time.perf_counter()
            for name, send in self._destinations():
                if name in state["sent"]:
                    continue
                if name == "cstore":
                    send(sr_path)  # the stored bytes as they are
                else:
                    if sr_ds is None:
                        sr_ds = pydicom.dcmread(sr_path)
                    send(sr_ds)
                state["sent"].append(name)
                self.spool.save_state(job, state)
                log.info("%s: SR sent by %s", tag, name)
            timings["send_s"] = time.perf_counter() - t0
        except (InputError, PermanentError) as exc:
            self._count("failed")
            record = {"study": tag, "study_uid": state.get("study_uid"), "status": "failed",
                      "reason": f"{type(exc).__name__}: {exc}", "attempts": state["attempts"] + 1,
                      "sent": state["sent"], "time": self._clock()}
            out = self.spool.fail(job, record)
            log.error("%s: FAILED (%s); record %s", tag, record["reason"], out)
            return 1
        except Exception as exc:  # PACS/Triton down, network: retry with back-off
            state["attempts"] += 1
            delay = min(self.config.retry_max_s, self.config.retry_initial_s * 2 ** (state["attempts"] - 1))
            state["next_attempt"] = self._clock() + delay
            state["last_error"] = f"{type(exc).__name__}: {exc}"[:500]
            self._count("retries")
            give_up = self.config.give_up_after_s
            if give_up is not None and self._clock() - state.get("created", started) > give_up:
                self._count("failed")
                record = {"study": tag, "study_uid": state.get("study_uid"), "status": "failed",
                          "reason": f"gave up after {state['attempts']} attempts over {give_up:g} s; last error: "
                                    f"{state['last_error']}", "attempts": state["attempts"], "sent": state["sent"],
                          "time": self._clock()}
                out = self.spool.fail(job, record)
                log.error("%s: FAILED (%s); record %s", tag, record["reason"], out)
                return 1
            self.spool.save_state(job, state)
            log.warning("%s: attempt %d failed (%s); retrying in %.1f s", tag, state["attempts"],
                        state["last_error"], delay)
            return 0
        if not info:  # built by an earlier attempt: read the UIDs back
            ds = sr_ds if sr_ds is not None else pydicom.dcmread(sr_path, specific_tags=["SOPInstanceUID",
                                                                                       "SeriesInstanceUID"])
            info = {"sop_instance_uid": str(ds.SOPInstanceUID), "series_instance_uid": str(ds.SeriesInstanceUID)}
        record = {"study": tag, "study_uid": state.get("study_uid"), "status": "done",
                  "sr_sop_instance_uid": info["sop_instance_uid"],
                  "sr_series_instance_uid": info["series_instance_uid"], "sent": state["sent"],
                  "attempts": state["attempts"] + 1, "time": self._clock(),
                  "timings_s": {k: round(v, 4) for k, v in timings.items()}}
        self.spool.finish(job, record, keep_instances=self.config.keep_instances)
        self._count("sent")
        log.info("%s: done (SR stored in the PACS)", tag)
        return 1

    def _destinations(self) -> list[tuple[str, Callable[[Any], None]]]:
        out: list[tuple[str, Callable[[Any], None]]] = []
        if self.config.cstore is not None:
            dest = self.config.cstore
            out.append(("cstore", lambda ds: send_cstore(ds, dest, self.config.ae_title)))
        if self.config.stow is not None:
            sdest = self.config.stow
            out.append(("stow", lambda ds: send_stow(ds, sdest)))
        return out

    def make_sr(self, job: Path, timings: dict[str, float] | None = None) -> tuple[bytes, dict[str, Any]]:
        """Read the study's instances, run the diagnoser, build and encode one TID 1500 SR
        (:func:`encode_sr`, in an SR process when ``sr_processes`` > 0)."""
        import pydicom

        timings = {} if timings is None else timings
        t0 = time.perf_counter()

        from hygeia.data.io import load_dataset, prepare_image

        files = sorted((job / "instances").glob("*.dcm"))
        if not files:
            raise InputError("study", "at least one received image", got="none")
        datasets = [pydicom.dcmread(f) for f in files]
        datasets.sort(key=lambda d: (str(getattr(d, "SeriesInstanceUID", "")), int(getattr(d, "InstanceNumber", 0) or 0)))
        diag = self.diagnoser()
        size = tuple(getattr(diag, "input_size", (64, 64)))
        images = np.stack([prepare_image(load_dataset(d).pixels, size=size) for d in datasets])
        texts = [clinical_text(d) for d in datasets]
        texts_arg = texts if any(texts) else None
        timings["read_s"] = time.perf_counter() - t0
        diagnoses: list[Any] = []
        bs = max(1, self.config.batch_size)
        with self._diagnose_lock:
            t0 = time.perf_counter()  # the diagnoser's own time, not the wait for the lock
            for i in range(0, len(datasets), bs):
                diagnoses.extend(diag.diagnose(images[i:i + bs],
                                               texts=None if texts_arg is None else texts_arg[i:i + bs]))
        timings["diagnose_s"] = time.perf_counter() - t0
        if len(diagnoses) != len(datasets):
            raise InputError("diagnoser output", f"one Diagnosis per image ({len(datasets)})", got=len(diagnoses))
        for d in datasets:  # the SR needs headers only: no pixels to pickle or copy
            if "PixelData" in d:
                del d.PixelData
        t0 = time.perf_counter()
        uids = report_uids(datasets, diagnoses[0].model)
        if self._sr_pool is None:
            out = encode_sr(diagnoses, datasets, **uids)
        else:
            from concurrent.futures.process import BrokenProcessPool

            pool = self._sr_pool
            try:
                out = pool.submit(encode_sr, diagnoses, datasets, **uids).result()
            except BrokenProcessPool:  # an SR process died (killed, out of memory): new pool, retry later
                with self._claim_lock:  # one worker replaces the broken pool, the others find it replaced
                    if self._sr_pool is pool:
                        log.error("an SR process died; restarting the SR processes")
                        pool.shutdown(wait=False, cancel_futures=True)
                        self._start_sr_pool()
                raise
        timings["sr_s"] = time.perf_counter() - t0
        return out

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
