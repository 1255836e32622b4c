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

import hashlib
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hygeia.errors import InputError

from .config import GatewayConfig
from .senders import PermanentError, send_cstore, send_stow
from .spool import Spool, durable_write

log = logging.getLogger("hygeia_pacs.gateway")

# Failure statuses for rejected instances (0xC000-0xCFFF: "Cannot understand", PS3.4 B.2.3).
STATUS_UNDECODABLE = 0xC210  # not a decodable DICOM data set
STATUS_NO_PIXELS = 0xC211  # DICOM without pixel data
STATUS_MODALITY = 0xC212  # modality not accepted
STATUS_VOLUME = 0xC213  # 3D volume (several frames) where a 2D image is expected
STATUS_PIXELS = 0xC214  # pixel data not decodable (transfer syntax / compression)
STATUS_BAD_UID = 0xC215  # missing or malformed Study/SOP Instance UID
STATUS_OUT_OF_RESOURCES = 0xA700  # could not write to the spool


def study_tag(study_uid: str) -> str:
    """A short, non-reversible name for a study in logs (no PHI, no UID)."""
    return "study#" + hashlib.sha256(study_uid.encode()).hexdigest()[:10]


SR_FORMAT = "sr"
"""The output format (``hygeia_output_formats``) that builds the reports the gateway sends."""


def encode_sr(diagnoses: list[Any], datasets: list[Any]) -> tuple[bytes, dict[str, Any]]:
    """Build one TID 1500 SR through the ``sr`` output format and encode it as a PS3.10 file.

    Returns the bytes and the SR's SOP Instance UID, Series Instance UID and number of finding
    groups. Runs in a worker thread or, with ``sr_processes``, in a separate process (the
    arguments are pickled: diagnoses and pixel-free headers).
    """
    import pydicom

    from hygeia.plugins import get_registry

    fmt = get_registry().output_format(SR_FORMAT)
    if fmt.build is None:
        raise InputError(f"output format {SR_FORMAT!r} ({fmt.package})", "a format that builds reports in memory",
                         got="a file writer only")
    sr, = fmt.build(diagnoses, sources=datasets)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, sr, enforce_file_format=True)
    return buf.getvalue(), {"sop_instance_uid": str(sr.SOPInstanceUID),
                            "series_instance_uid": str(sr.SeriesInstanceUID), "groups": _count_groups(sr)}


def _warm_sr_process() -> None:
    """Process-pool initializer: import the SR stack once, before the first study."""
    import highdicom  # noqa: F401

    from hygeia.plugins import get_registry

    get_registry().output_format(SR_FORMAT)


def clinical_text(ds: Any) -> str:
    """Clinical history carried by an image, if any (Additional Patient History, Reason for Study)."""
    parts = [str(getattr(ds, kw, "") or "").strip() for kw in
             ("AdditionalPatientHistory", "ReasonForTheRequestedProcedure", "ReasonForStudy")]
    return " ".join(p for p in parts if p)


class Gateway:
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
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        if self._diagnoser is None and not self.config.server:
            self.diagnoser()  # a local plugin that cannot load is a configuration error: fail now
        ae = AE(ae_title=self.config.ae_title)
        ae.require_calling_aet = list(self.config.allowed_callers)
        ae.maximum_pdu_size = 0
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, list(self.config.transfer_syntaxes))
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ABORTED, self._on_aborted)]
        self._ae = ae
        self._server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        self._stop.clear()
        if self.config.sr_processes:
            self._start_sr_pool()
        self._workers = [threading.Thread(target=self._work_loop, name=f"hygeia-gateway-worker-{i}", daemon=True)
                         for i in range(self.config.workers)]
        for w in self._workers:
            w.start()
        log.info("gateway %s listening on %s:%d (callers %s); spool %s", self.config.ae_title, self.config.host,
                 self.config.port, ",".join(self.config.allowed_callers), self.config.spool)
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
            if self.config.server:
                from hygeia.serving import connect

                self._diagnoser = connect("diagnoser", self.config.diagnoser, self.config.server)
            else:
                import hygeia

                self._diagnoser = hygeia.create("diagnoser", self.config.diagnoser)
        return self._diagnoser

    # -- receiving -----------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[key] += n

    def _reject(self, event: Any, status: int, reason: str) -> Any:
        from pydicom import Dataset

        self._count("rejected")
        caller = getattr(getattr(event.assoc, "requestor", None), "ae_title", "?")
        sop_class = str(getattr(getattr(event, "request", None), "AffectedSOPClassUID", "?"))
        log.warning("rejected instance from %s: %s (SOP Class %s, status 0x%04X)", caller, reason, sop_class, status)
        ds = Dataset()
        ds.Status = status
        ds.ErrorComment = reason[:64]
        return ds

    def _on_rejected(self, event: Any) -> None:
        caller = getattr(getattr(event.assoc, "requestor", None), "ae_title", "?")
        log.warning("association from AE title %r rejected (not in allowed_callers)", caller)

    def _on_aborted(self, event: Any) -> None:
        log.info("association aborted")

    def _on_store(self, event: Any) -> Any:
        """C-STORE handler: validate, store durably, then answer."""
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            _ = [elem for elem in ds]  # force parsing of every top-level element
        except Exception as exc:
            return self._reject(event, STATUS_UNDECODABLE, f"not a decodable DICOM data set ({type(exc).__name__})")
        study_uid, sop_uid = str(getattr(ds, "StudyInstanceUID", "")), str(getattr(ds, "SOPInstanceUID", ""))
        if not study_uid or not sop_uid:
            return self._reject(event, STATUS_BAD_UID, "missing Study Instance UID or SOP Instance UID")
        if "PixelData" not in ds:
            return self._reject(event, STATUS_NO_PIXELS, "no Pixel Data: an image is expected")
        modality = str(getattr(ds, "Modality", "")).upper()
        if modality not in self.config.modalities:
            return self._reject(event, STATUS_MODALITY,
                                f"modality {modality or 'none'} not accepted ({'/'.join(self.config.modalities)})")
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 1:
            return self._reject(event, STATUS_VOLUME, f"3D volume ({frames} frames): 2D image expected")
        from hygeia.data.io import load_dataset

        try:
            load_dataset(ds, name="received instance")
        except InputError as exc:
            return self._reject(event, STATUS_PIXELS, f"pixel data not usable: {exc.got}"[:64])
        try:
            self.spool.store(study_uid, sop_uid, event.encoded_dataset(include_meta=True))
        except ValueError as exc:
            return self._reject(event, STATUS_BAD_UID, str(exc))
        except OSError as exc:
            log.error("cannot write to the spool: %s", exc)
            return self._reject(event, STATUS_OUT_OF_RESOURCES, "gateway spool not writable")
        self._count("accepted")
        return 0x0000

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
        if self._sr_pool is None:
            out = encode_sr(diagnoses, datasets)
        else:
            from concurrent.futures.process import BrokenProcessPool

            pool = self._sr_pool
            try:
                out = pool.submit(encode_sr, diagnoses, datasets).result()
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


def _count_groups(sr: Any) -> int:
    try:
        return sum(1 for _ in sr.ContentSequence[-1].ContentSequence)
    except Exception:
        return 0
