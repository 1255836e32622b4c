"""The gateway on a real RabbitMQ: one receiving gateway publishes studies to a quorum queue, two
worker processes (`hygeia gateway work`) diagnose them and send SRs to a real Orthanc; one worker
is killed with SIGKILL mid-load. Every acknowledged study ends with exactly one SR."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orthanc import Orthanc, orthanc_bin  # noqa: F401  (fixture)
from rabbitmq import RabbitMQ, available
from test_gateway import SCU_AET, dicomweb, gateway_config, phantom_study, storescu, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not available(), reason="needs rabbitmq-server")]


@pytest.fixture
def rabbit(tmp_path):
    r = RabbitMQ(tmp_path / "rabbitmq").start()
    yield r
    r.stop()


def sr_instances(o: Orthanc) -> list[dict]:
    return dicomweb(o).search_for_instances(search_filters={"Modality": "SR"}, fields=["StudyInstanceUID"])


def test_two_workers_one_killed_lose_nothing_and_send_no_duplicate(orthanc_bin, rabbit, tmp_path):
    from hygeia_pacs import Gateway, GatewayConfig

    o = Orthanc(tmp_path / "orthanc").start()
    procs: list[subprocess.Popen] = []
    try:
        recv = GatewayConfig.from_dict(gateway_config(tmp_path / "recv", o, broker=rabbit.url, consume=False,
                                                      study_timeout_s=0.5, stow=None))
        workers = []
        for i in range(2):
            cfg = gateway_config(tmp_path / f"w{i}", o, broker=rabbit.url, receive=False, stow=None, workers=1)
            path = tmp_path / f"worker{i}.json"
            path.write_text(json.dumps(cfg))
            workers.append(path)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for i, path in enumerate(workers):
            log = open(tmp_path / f"worker{i}.log", "wb")
            procs.append(subprocess.Popen([sys.executable, "-m", "hygeia", "gateway", "work", str(path)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        n = 24
        with Gateway(recv) as gw:
            for s in range(n):
                r = storescu(gw.config.port, phantom_study(tmp_path / f"study{s}", seed=100 + s, n=1))
                assert r.returncode == 0, r.stderr
            acknowledged = gw.counters["accepted"]
            wait_for(lambda: len(sr_instances(o)) >= 4, 240, "the first SRs")
            os.killpg(procs[0].pid, signal.SIGKILL)  # mid-load: studies are still queued or in flight
            killed_at = len(sr_instances(o))
            wait_for(lambda: len(sr_instances(o)) >= n, 300, "an SR for every study", step=0.5)
            time.sleep(2)  # a late duplicate would show up now
        srs = sr_instances(o)
        studies = [i["0020000D"]["Value"][0] for i in srs]
        assert acknowledged == n
        assert killed_at < n, "the worker was killed after all the work was done"
        assert len(studies) == n and len(set(studies)) == n, (len(studies), len(set(studies)))  # 0 lost, 0 duplicates
        failures = [f for i in range(2) for f in (tmp_path / f"w{i}" / "spool" / "failed").glob("*.json")]
        assert not failures
        status = subprocess.run([sys.executable, "-m", "hygeia", "gateway", "status", str(workers[1])],
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        broker = json.loads(status.stdout)["broker"]
        assert broker["queued"] == 0 and broker["dead_letters"] == 0
        assert "guest:***@" in broker["broker"]  # no password in the output
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        o.stop()


def test_empty_or_corrupt_message_is_dead_lettered_on_first_delivery(orthanc_bin, rabbit, tmp_path, caplog):
    """A message with no instances, or one that is not a packed study, is dead-lettered the first
    time a worker sees it (it was handed back until the delivery limit), with one log line each;
    the worker goes on serving: a real study published after them gets its SR."""
    import logging

    from hygeia_pacs import Gateway, GatewayConfig
    from hygeia_pacs.broker import BrokerQueue, pack_job

    o = Orthanc(tmp_path / "orthanc").start()
    recv = GatewayConfig.from_dict(gateway_config(tmp_path / "gw", o, broker=rabbit.url, study_timeout_s=0.5,
                                                  stow=None, workers=1))
    q = BrokerQueue(rabbit.url, recv.broker_queue, recv.broker_delivery_limit)
    try:
        empty = tmp_path / "empty.job"
        empty.mkdir()
        (empty / "state.json").write_text("{}")
        q.publish("study.empty", pack_job(empty))
        q.publish("study.garbage", b"this is not a tar archive" * 40)
        with caplog.at_level(logging.WARNING, logger="hygeia_pacs.distributed"), Gateway(recv) as gw:
            wait_for(lambda: q.counts()["dead_letters"] == 2, 60, "both messages dead-lettered")
            r = storescu(gw.config.port, phantom_study(tmp_path / "study", seed=300, n=1))
            assert r.returncode == 0, r.stderr
            wait_for(lambda: len(sr_instances(o)) == 1, 120, "the real study's SR")
        dead = {d["job"]: d for d in q.dead_letters()}
        assert set(dead) == {"study.empty", "study.garbage"}
        assert all(d["reason"] == "rejected" for d in dead.values()), dead  # nacked, not the delivery limit
        lines = [r.getMessage() for r in caplog.records]
        assert len([m for m in lines if m.startswith("empty: message holds no instances")]) == 1, lines
        assert len([m for m in lines if m.startswith("garbage: message is not a packed study")]) == 1, lines
        assert q.counts()["queued"] == 0
    finally:
        q.close()
        o.stop()
