"""The gateway's work loop on a broker (``broker`` in the config): publish closed studies, consume any.

Each worker thread holds its own broker connection. A receiving gateway publishes every study
the spool has closed, then removes its local copy; a working gateway takes one study at a time,
unpacks it into ``<spool>/work/``, runs the same :meth:`Gateway.process` as the local queue, and
acknowledges the study once its SR is stored (a done record), dead-letters it on a failure
record, or hands it back after the retry delay otherwise.
"""
from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path
from typing import Any

from .broker import BrokerQueue, Delivery, describe, unpack_job

log = logging.getLogger(__name__)


def work_root(gw: Any) -> Path:
    return gw.spool.root / "work"


def clear_work(gw: Any) -> None:
    """Studies left half-processed by a crash: their messages were never acknowledged, the broker
    redelivers them, so the local copies go."""
    shutil.rmtree(work_root(gw), ignore_errors=True)
    work_root(gw).mkdir(parents=True, exist_ok=True)


def publish_closed(gw: Any, q: BrokerQueue) -> int:
    """Close idle studies and publish every closed one (each removed locally after the broker confirms)."""
    gw.spool.close_idle(gw.config.study_timeout_s, now=gw._clock())
    published = 0
    with gw.spool.lock:  # as the local pipeline lists them: close_idle makes a job whole under this lock
        jobs = gw.spool.jobs()
    for job in jobs:
        with gw._claim_lock:
            if job.name in gw._claimed:
                continue
            gw._claimed.add(job.name)
        try:
            if not job.is_dir():
                continue
            if gw.spool.is_empty(job):  # a crash before the study moved in
                shutil.rmtree(job, ignore_errors=True)
                log.warning("%s: empty job folder left by a crash, removed", job.name.rsplit(".", 1)[-1])
                continue
            q.publish_job(job)
            shutil.rmtree(job)
            published += 1
            log.info("%s: published to the broker queue", job.name.rsplit(".", 1)[-1])
        finally:
            with gw._claim_lock:
                gw._claimed.discard(job.name)
    return published


def handle(gw: Any, q: BrokerQueue, d: Delivery) -> None:
    """Process one delivered study and settle it with the broker."""
    job = work_root(gw) / d.job_name
    shutil.rmtree(job, ignore_errors=True)
    tag = d.job_name.rsplit(".", 1)[-1]
    try:
        unpack_job(d.payload, job)
    except (tarfile.TarError, OSError) as exc:  # not a study this gateway packed: no retry can help
        log.warning("%s: message is not a packed study (%s: %s); dead-lettered", tag, type(exc).__name__,
                    str(exc)[:120])
        shutil.rmtree(job, ignore_errors=True)
        q.dead_letter(d)
        return
    if gw.spool.is_empty(job):
        log.warning("%s: message holds no instances and no SR; dead-lettered", tag)
        shutil.rmtree(job, ignore_errors=True)
        q.dead_letter(d)
        return
    state = gw.spool.state(job)
    state["attempts"] = max(int(state.get("attempts", 0)), d.deliveries)
    gw.process(job, state)
    if (gw.spool.done / f"{job.name}.json").exists():
        q.ack(d)
    elif (gw.spool.failed / f"{job.name}.json").exists():
        q.dead_letter(d)
    else:  # a retryable failure: wait out the back-off, then hand the study back
        delay = max(0.0, float(gw.spool.state(job).get("next_attempt", 0.0)) - gw._clock())
        gw._stop.wait(min(delay, gw.config.retry_max_s))
        shutil.rmtree(job, ignore_errors=True)
        q.requeue(d)


def work_loop(gw: Any) -> None:
    """One worker thread's loop in broker mode (runs until the gateway stops)."""
    cfg = gw.config
    q = BrokerQueue(cfg.broker, cfg.broker_queue, cfg.broker_delivery_limit)
    backoff = cfg.retry_initial_s
    try:
        while not gw._stop.is_set():
            try:
                busy = publish_closed(gw, q) if cfg.receive else 0
                d = q.get() if cfg.consume else None
                if d is not None:
                    handle(gw, q, d)
                backoff = cfg.retry_initial_s
                if d is None and not busy:
                    gw._wake.wait(cfg.poll_s)
                    gw._wake.clear()
            except Exception as exc:  # broker down or connection lost: nothing is lost, try again
                log.warning("broker %s: %s: %s; retrying in %.1f s", describe(cfg.broker), type(exc).__name__,
                            str(exc)[:200], backoff)
                q.close()
                gw._stop.wait(backoff)
                backoff = min(cfg.retry_max_s, backoff * 2)
    finally:
        q.close()
