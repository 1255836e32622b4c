"""The PACS gateway against a real Orthanc (DICOM + DICOMweb) with dcmtk's storescu/findscu.

Flow tested: phantom study --storescu--> gateway --(cnn diagnoser)--> TID 1500 SR --C-STORE and
STOW-RS--> Orthanc; the SR is then found with findscu (C-FIND) and QIDO-RS, retrieved with
WADO-RS and checked. Failure modes: Orthanc stopped during a run and restarted (nothing lost),
the gateway killed with SIGKILL after acknowledging a study and restarted (it resumes).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from orthanc import PASSWORD, USER, Orthanc, free_port, orthanc_bin, wait_port  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not shutil.which("storescu"), reason="needs dcmtk (storescu, findscu)")]

GATEWAY_AET, SCU_AET = "HYGEIA", "STORESCU"


def phantom_study(folder: Path, seed: int, n: int) -> list[Path]:
    """A real phantom study (hygeia_lab.write_phantom_study): n DX instances, one series."""
    from hygeia_lab import write_phantom_study

    return [Path(p) for p in write_phantom_study(folder, n=n, seed=seed)]


def storescu(port: int, files: list[Path], aet: str = SCU_AET, aec: str = GATEWAY_AET) -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=60)


def gateway_config(tmp: Path, orthanc: Orthanc, **over) -> dict:
    cfg = {
        "spool": str(tmp / "spool"), "ae_title": GATEWAY_AET, "host": "127.0.0.1", "port": free_port(),
        "allowed_callers": [SCU_AET, "ORTHANC"], "diagnoser": "cnn", "study_timeout_s": 1.0,
        "modalities": ["DX", "CR"], "retry_initial_s": 0.3, "retry_max_s": 1.0,
        "cstore": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
        "stow": {"url": orthanc.dicomweb_url, "username": USER, "password": PASSWORD},
    }
    cfg.update(over)
    return cfg


def wait_for(pred, timeout: float, what: str, step: float = 0.1):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def done_records(spool: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((spool / "done").glob("*.json"))]


def findscu_sr_series(orthanc: Orthanc, study_uid: str, workdir: Path) -> list[pydicom.Dataset]:
    """C-FIND (dcmtk findscu) for SR series of a study; responses extracted as DICOM files."""
    out = workdir / f"find-{time.time_ns()}"
    out.mkdir()
    r = subprocess.run(["findscu", "-S", "-aet", "FINDSCU", "-aec", orthanc.aet, "-X", "-od", str(out),
                        "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}",
                        "-k", "Modality=SR", "-k", "SeriesInstanceUID", "-k", "SeriesDescription",
                        "127.0.0.1", str(orthanc.dicom_port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def dicomweb(orthanc: Orthanc):
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    return DICOMwebClient(url=orthanc.dicomweb_url, session=create_session_from_user_pass(USER, PASSWORD))


@pytest.fixture(scope="module")
def orthanc(orthanc_bin, tmp_path_factory):
    o = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield o
    o.stop()


@pytest.fixture(scope="module")
def cnn():
    import hygeia

    return hygeia.create("diagnoser", "cnn")



def located_groups(report) -> list:  # noqa: ANN001
    """The measurement groups of a Hygeia SR whose probability is inferred from an image region."""
    from pydicom.sr.codedict import codes

    return [g for g in report.get_image_measurement_groups()
            if g.get_measurements(name=codes.DCM.Probability)[0].referenced_coordinates]

def test_study_to_sr_in_orthanc(orthanc, cnn, tmp_path):
    import highdicom as hd

    from hygeia_pacs import Gateway, GatewayConfig

    files = phantom_study(tmp_path / "study", seed=101, n=3)
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    assert storescu(orthanc.dicom_port, files, aec=orthanc.aet).returncode == 0  # the images are in the PACS
    cfg = GatewayConfig.from_dict(gateway_config(tmp_path, orthanc))
    with Gateway(cfg, diagnoser=cnn) as gw:
        r = storescu(cfg.port, files)
        assert r.returncode == 0, r.stderr
        assert gw.wait_idle(120), gw.status()
        status = gw.status()
    assert status["accepted"] == 3 and status["done"] == 1 and status["failed"] == 0
    (record,) = done_records(cfg.spool)
    assert record["sent"] == ["cstore", "stow"] and record["study_uid"] == study_uid
    sr_uid = record["sr_sop_instance_uid"]

    found = findscu_sr_series(orthanc, study_uid, tmp_path)  # C-FIND
    assert [d.SeriesInstanceUID for d in found] == [record["sr_series_instance_uid"]]
    client = dicomweb(orthanc)
    series = client.search_for_series(study_instance_uid=study_uid, search_filters={"Modality": "SR"})  # QIDO-RS
    assert len(series) == 1
    instances = client.search_for_instances(study_instance_uid=study_uid,
                                            series_instance_uid=record["sr_series_instance_uid"])
    assert [i["00080018"]["Value"][0] for i in instances] == [sr_uid]
    ds = client.retrieve_instance(study_uid, record["sr_series_instance_uid"], sr_uid)  # WADO-RS
    assert ds.StudyInstanceUID == study_uid and ds.VerificationFlag == "UNVERIFIED"
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    groups = report.get_image_measurement_groups()
    assert len(groups) == 3 * len(cnn.findings)  # one group per image and finding
    assert all(g.tracking_identifier and g.tracking_uid for g in groups)
    library = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"]
    lib_uids = {img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for grp in library[0].ContentSequence for img in grp.ContentSequence}
    assert lib_uids == {pydicom.dcmread(f).SOPInstanceUID for f in files}


def test_concurrent_workers_store_one_sr_per_study(orthanc, cnn, tmp_path):
    """Several workers at once (diagnose serialised, SRs built in 2 processes, sending overlapped): every
    study of one storescu run ends with exactly one SR in Orthanc, none twice, none lost."""
    from hygeia_pacs import Gateway, GatewayConfig

    studies = [phantom_study(tmp_path / f"s{k}", seed=300 + k, n=1 + k % 2) for k in range(6)]
    uids = {str(pydicom.dcmread(files[0]).StudyInstanceUID) for files in studies}
    cfg = GatewayConfig.from_dict(gateway_config(tmp_path, orthanc, workers=3, sr_processes=2,
                                                     study_timeout_s=0.3, stow=None))
    with Gateway(cfg, diagnoser=cnn) as gw:
        assert len(gw._workers) == 3
        assert storescu(cfg.port, [f for files in studies for f in files]).returncode == 0
        wait_for(lambda: gw.status()["done"] == len(studies), 120, "every study done")
        assert gw.wait_idle(60), gw.status()
        status = gw.status()
    assert status["done"] == len(studies) and status["failed"] == 0 and status["sent"] == len(studies)
    records = done_records(cfg.spool)
    assert sorted(r["study_uid"] for r in records) == sorted(uids)  # each study once
    client = dicomweb(orthanc)
    for r in records:
        series = client.search_for_series(study_instance_uid=r["study_uid"], search_filters={"Modality": "SR"})
        assert [x["0020000E"]["Value"][0] for x in series] == [r["sr_series_instance_uid"]]


def test_pacs_down_during_run_then_back(orthanc, cnn, tmp_path):
    """Orthanc stops while a study is processed: the gateway retries; after a restart, nothing is lost."""
    from hygeia_pacs import Gateway, GatewayConfig

    studies = [phantom_study(tmp_path / f"s{k}", seed=200 + k, n=1) for k in range(2)]
    cfg = GatewayConfig.from_dict(gateway_config(tmp_path, orthanc))
    with Gateway(cfg, diagnoser=cnn) as gw:
        orthanc.stop()
        for files in studies:
            assert storescu(cfg.port, files).returncode == 0
        job_states = lambda: [gw.spool.state(j) for j in gw.spool.jobs()]  # noqa: E731
        wait_for(lambda: len(job_states()) == 2 and all(s["attempts"] >= 2 for s in job_states()), 60,
                 "two retries per study while the PACS is down")
        assert all("association" in s["last_error"] for s in job_states())
        assert done_records(cfg.spool) == [] and not list((cfg.spool / "failed").glob("*.json"))
        orthanc.start()
        assert gw.wait_idle(120), gw.status()
    records = done_records(cfg.spool)
    assert len(records) == 2 and all(r["sent"] == ["cstore", "stow"] for r in records)
    client = dicomweb(orthanc)
    for files, rec in zip(sorted(studies, key=lambda f: pydicom.dcmread(f[0]).StudyInstanceUID),
                          sorted(records, key=lambda r: r["study_uid"])):
        found = client.search_for_instances(study_instance_uid=rec["study_uid"], search_filters={"Modality": "SR"})
        assert rec["sr_sop_instance_uid"] in [i["00080018"]["Value"][0] for i in found]


def test_gateway_killed_after_ack_resumes(orthanc, tmp_path):
    """SIGKILL after the C-STORE was acknowledged: the restarted `hygeia gateway` finishes the study."""
    files = phantom_study(tmp_path / "study", seed=301, n=2)
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    cfg = gateway_config(tmp_path, orthanc, study_timeout_s=2.0)
    cfg_path = tmp_path / "gateway.json"
    cfg_path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "gateway.log", "ab")

    def launch() -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "hygeia", "gateway", "run", str(cfg_path)], stdout=log,
                             stderr=subprocess.STDOUT, env=env)
        assert wait_port(cfg["port"], timeout=120), (tmp_path / "gateway.log").read_text()[-3000:]
        return p

    proc = launch()
    try:
        assert storescu(cfg["port"], files).returncode == 0
        proc.send_signal(signal.SIGKILL)  # within the 2 s study time-out: nothing processed yet
        proc.wait(10)
        spool = Path(cfg["spool"])
        received = list((spool / "incoming" / study_uid).glob("*.dcm"))
        assert len(received) == 2  # acknowledged = on disk
        assert done_records(spool) == []
        proc = launch()
        wait_for(lambda: done_records(spool) and not list((spool / "processing").iterdir()), 180,
                 "the study's SR after the restart")
        (record,) = done_records(spool)
        assert record["study_uid"] == study_uid and record["sent"] == ["cstore", "stow"]
        assert not list((spool / "incoming").glob("*/*.dcm")) and not list((spool / "processing").iterdir())
        found = findscu_sr_series(orthanc, study_uid, tmp_path)
        assert record["sr_series_instance_uid"] in [d.SeriesInstanceUID for d in found]
        assert subprocess.run(["echoscu", "-aet", SCU_AET, "-aec", GATEWAY_AET, "127.0.0.1", str(cfg["port"])],
                              capture_output=True).returncode == 0  # still serving
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_remote_diagnoser_on_triton_down_then_up(orthanc, triton_repo, require_model, tmp_path):
    """The gateway diagnoses on Triton (RemoteDiagnoser over gRPC). Triton is down when the study
    arrives: the gateway retries with back-off; once Triton is up the SR reaches Orthanc, with the
    same findings and regions as the local cnn gives (asked for as ``heatmaps="regions"``)."""
    import highdicom as hd
    import numpy as np
    from pydicom.sr.codedict import codes

    import hygeia
    from hygeia.data.io import load_image, prepare_image
    from hygeia.serving.server import TritonServer
    from hygeia_pacs import Gateway, GatewayConfig
    from hygeia_pacs.gateway import diagnose_options

    require_model("diagnoser_cnn")
    files = phantom_study(tmp_path / "study", seed=404, n=2)  # two located findings
    grpc_port = free_port()
    cfg = GatewayConfig.from_dict(gateway_config(tmp_path, orthanc, server=f"127.0.0.1:{grpc_port}", stow=None))
    with Gateway(cfg) as gw:  # no diagnoser object: built with hygeia.serving.connect on first use
        assert storescu(cfg.port, files).returncode == 0
        job_states = lambda: [gw.spool.state(j) for j in gw.spool.jobs()]  # noqa: E731
        wait_for(lambda: job_states() and job_states()[0]["attempts"] >= 2, 60, "retries while Triton is down")
        assert done_records(cfg.spool) == []
        with TritonServer(triton_repo, grpc_port=grpc_port, models=["diagnoser_cnn"], startup_timeout=180):
            assert gw.wait_idle(180), gw.status()
        assert diagnose_options(gw.diagnoser()) == {"heatmaps": "regions"}
    (record,) = done_records(cfg.spool)
    assert record["sent"] == ["cstore"] and record["attempts"] >= 3
    client = dicomweb(orthanc)
    ds = client.retrieve_instance(record["study_uid"], record["sr_series_instance_uid"], record["sr_sop_instance_uid"])
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    groups = report.get_image_measurement_groups()
    remote_probs = sorted(g.get_measurements(name=codes.DCM.Probability)[0].value for g in groups)
    local = hygeia.create("diagnoser", "cnn")
    batch = np.stack([prepare_image(load_image(f).pixels, local.input_size) for f in files])
    local_dx = local.diagnose(batch, heatmaps="present")
    local_probs = sorted(round(f.probability, 6) for d in local_dx for f in d.findings)
    np.testing.assert_allclose(remote_probs, local_probs, atol=1e-4)
    # the gateway asked Triton for regions without maps: every located finding still has its region
    located = sum(f.region is not None for d in local_dx for f in d.findings)
    assert located and len(located_groups(report)) == located


class ConnectionCounter:
    """A TCP port that accepts and at once closes every connection, counting them: a server that is
    down, and a record of every time the gateway tried it."""

    def __init__(self, port: int) -> None:
        self.count = 0
        self.sock = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.count += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset: no TIME_WAIT
            conn.close()

    def close(self) -> None:
        """Stop listening (the port is free for a real server at once)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()


def test_local_fallback_while_triton_is_down(orthanc, triton_repo, require_model, tmp_path, caplog):
    """``local_fallback``: the server is down at ``server``, so after the connection's retries the
    gateway diagnoses in process; the SR reaches Orthanc on the first attempt, one log line says so,
    and the images are counted as diagnosed locally. For ``fallback_probe_s`` the next study runs in
    process without trying the server (no connection reaches its port); once a tritonserver listens
    there and the interval is over, the next study is diagnosed on it (one more log line, no more
    local images). Without the option a study waits for Triton (the test above)."""
    import logging

    import highdicom as hd

    from hygeia.serving.server import TritonServer
    from hygeia_pacs import Gateway, GatewayConfig

    require_model("diagnoser_cnn")
    first, middle, last = (phantom_study(tmp_path / name, seed=seed, n=2)
                           for name, seed in (("first", 404), ("middle", 405), ("last", 406)))
    grpc_port, probe_s = free_port(), 20.0
    cfg = GatewayConfig.from_dict(gateway_config(tmp_path, orthanc, server=f"127.0.0.1:{grpc_port}",
                                                 local_fallback=True, fallback_probe_s=probe_s, stow=None))
    down = ConnectionCounter(grpc_port)
    with caplog.at_level(logging.WARNING, logger="hygeia_pacs.gateway"), Gateway(cfg) as gw:
        assert storescu(cfg.port, first).returncode == 0
        assert gw.wait_idle(120), gw.status()
        fell_back_by = time.monotonic()
        assert gw.counters["diagnosed_locally"] == 2 and gw.counters["retries"] == 0
        tried = down.count
        assert tried > 0  # the gateway tried the server before falling back
        assert storescu(cfg.port, middle).returncode == 0
        assert gw.wait_idle(120), gw.status()
        assert gw.counters["diagnosed_locally"] == 4
        assert time.monotonic() - fell_back_by < probe_s, "the middle study came too late to test the interval"
        assert down.count == tried  # within fallback_probe_s the server was not tried again
        down.close()
        with TritonServer(triton_repo, grpc_port=grpc_port, models=["diagnoser_cnn"], startup_timeout=180):
            time.sleep(max(0.0, fell_back_by + probe_s + 0.5 - time.monotonic()))
            assert storescu(cfg.port, last).returncode == 0
            wait_for(lambda: len(done_records(cfg.spool)) == 3, 120, "the last study's SR")
        assert gw.counters["diagnosed_locally"] == 4  # the last study ran on Triton
    records = done_records(cfg.spool)
    assert all(r["sent"] == ["cstore"] and r["attempts"] == 1 for r in records)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "in process until it answers" in m]) == 1, messages
    assert len([m for m in messages if "answers again" in m and "until" not in m]) == 1, messages
    local = next(r for r in records if r["study_uid"] == str(pydicom.dcmread(first[0]).StudyInstanceUID))
    ds = dicomweb(orthanc).retrieve_instance(local["study_uid"], local["sr_series_instance_uid"],
                                             local["sr_sop_instance_uid"])
    groups = located_groups(hd.sr.Comprehensive3DSR.from_dataset(ds).content)
    assert len(groups) == 2  # the two located findings of the first study, as the local cnn gives them


def test_local_fallback_must_be_a_boolean(orthanc, tmp_path):
    from hygeia.errors import InputError
    from hygeia_pacs import GatewayConfig

    with pytest.raises(InputError, match="invalid gateway config local_fallback: expected true or false, got 'yes'"):
        GatewayConfig.from_dict(gateway_config(tmp_path, orthanc, local_fallback="yes"))
