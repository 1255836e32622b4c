"""The gateway's input checks, durable queue and failure records (no PACS needed).

Bad input reaches a real gateway SCP (pynetdicom, in-process) from independent clients (dcmtk's
storescu/echoscu and pynetdicom's SCU): each gets a clear rejection and the gateway keeps serving.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from hygeia.errors import InputError

pytestmark = pytest.mark.skipif(not shutil.which("storescu"), reason="needs dcmtk (storescu, echoscu)")

AET, SCU = "HYGEIA", "STORESCU"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _closed_port() -> int:
    return _free_port()  # nothing listens there: the "PACS" is down


@pytest.fixture(scope="module")
def cnn():
    import hygeia

    return hygeia.create("diagnoser", "cnn")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from hygeia_lab import write_phantom_dicom

    return Path(write_phantom_dicom(tmp_path_factory.mktemp("ph") / "dx.dcm", seed=7, finding="effusion"))


def _config(tmp_path: Path, **over):
    from hygeia_pacs import GatewayConfig

    d = {"spool": str(tmp_path / "spool"), "ae_title": AET, "port": _free_port(), "allowed_callers": [SCU],
         "diagnoser": "cnn", "study_timeout_s": 0.3, "modalities": ["DX", "CR"],
         "retry_initial_s": 0.1, "retry_max_s": 0.2,
         "cstore": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": _closed_port()}}
    d.update(over)
    return GatewayConfig.from_dict(d)


def _send(port: int, ds_or_path) -> int:
    """C-STORE with pynetdicom's SCU; returns the DIMSE status."""
    from pynetdicom import AE

    if isinstance(ds_or_path, (str, Path)):
        meta = pydicom.filereader.read_file_meta_info(ds_or_path)
        sop_class, ts = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
    else:
        sop_class, ts = ds_or_path.SOPClassUID, ds_or_path.file_meta.TransferSyntaxUID
    ae = AE(ae_title=SCU)
    ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds_or_path).Status)
    finally:
        assoc.release()


def _send_raw(port: int, sop_class: str, sop_uid: str, body: bytes) -> int:
    """C-STORE of raw data set bytes (Explicit VR Little Endian), bypassing any encoding."""
    from io import BytesIO

    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE

    ae = AE(ae_title=SCU)
    ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    try:
        cx = assoc.accepted_contexts[0]
        req = C_STORE()
        req.MessageID, req.Priority = 1, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, sop_uid
        req.DataSet = BytesIO(body)
        assoc._reactor_checkpoint.clear()  # pause the reactor as send_c_store does, then send
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(req, cx.context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        return int(rsp.Status)
    finally:
        assoc.release()


def test_bad_input_is_rejected_and_gateway_keeps_serving(cnn, phantom, tmp_path, caplog):
    from hygeia_pacs import Gateway
    from hygeia_pacs.listener import (STATUS_MODALITY, STATUS_NO_PIXELS, STATUS_UNDECODABLE, STATUS_VOLUME)

    cfg = _config(tmp_path, study_timeout_s=3600)
    good = pydicom.dcmread(phantom)
    with Gateway(cfg, diagnoser=cnn) as gw:
        # AE title not configured: association rejected (dcmtk echoscu), then a configured one works
        r = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", AET, "127.0.0.1", str(cfg.port)],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "reject" in (r.stdout + r.stderr).lower()
        assert subprocess.run(["echoscu", "-aet", SCU, "-aec", AET, "127.0.0.1", str(cfg.port)]).returncode == 0
        # DICOM without pixel data (an SR)
        assert _send(cfg.port, pydicom.dcmread(get_testdata_file("test-SR.dcm"))) == STATUS_NO_PIXELS
        # wrong modality (MR where DX/CR are configured)
        assert _send(cfg.port, pydicom.dcmread(get_testdata_file("MR_small.dcm"))) == STATUS_MODALITY
        # a 3D volume where a 2D image is expected: the phantom as 3 frames
        vol = pydicom.dcmread(phantom)
        vol.NumberOfFrames = 3
        vol.PixelData = vol.PixelData * 3
        assert _send(cfg.port, vol) == STATUS_VOLUME
        # not DICOM: a C-STORE whose data set bytes are no data set (a sequence of undefined
        # length whose first "item" has a wrong tag), sent through pynetdicom's DIMSE layer
        junk = (struct.pack("<HH", 0x0008, 0x1115) + b"SQ\x00\x00" + struct.pack("<I", 0xFFFFFFFF)
                + b"\x01\x02\x03\x04" + struct.pack("<I", 8) + b"garbage!")
        assert _send_raw(cfg.port, good.SOPClassUID, "1.2.3.4.5", junk) == STATUS_UNDECODABLE
        # a transfer syntax outside transfer_syntaxes (HTJ2K): no presentation context is accepted
        from pynetdicom import AE

        scu = AE(ae_title=SCU)
        scu.add_requested_context(good.SOPClassUID, "1.2.840.10008.1.2.4.201")
        scu.add_requested_context("1.2.840.10008.1.1")  # Verification: the association itself is accepted
        assoc = scu.associate("127.0.0.1", cfg.port, ae_title=AET)
        assert assoc.is_established
        try:
            assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == ["1.2.840.10008.1.1"]
        finally:
            assoc.release()
        # JPEG 2000 lossless (in the default transfer_syntaxes): negotiated as it is (dcmtk storescu
        # proposes it with -xv) and stored; its pixels read back as the uncompressed phantom's
        j2k = pydicom.dcmread(phantom)
        j2k.SOPInstanceUID = pydicom.uid.generate_uid()
        j2k.compress(pydicom.uid.JPEG2000Lossless)
        j2k.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
        r = subprocess.run(["storescu", "-xv", "-aet", SCU, "-aec", AET, "127.0.0.1", str(cfg.port),
                            str(tmp_path / "j2k.dcm")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        # ... and a good image is still accepted and on disk
        r = subprocess.run(["storescu", "-aet", SCU, "-aec", AET, "127.0.0.1", str(cfg.port), str(phantom)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        status = gw.status()
    assert status["rejected"] == 4 and status["accepted"] == 2
    stored = {p.stem: p for p in (cfg.spool / "incoming").glob("*/*.dcm")}
    assert sorted(stored) == sorted([good.SOPInstanceUID, j2k.SOPInstanceUID])
    assert str(pydicom.dcmread(stored[j2k.SOPInstanceUID]).file_meta.TransferSyntaxUID) == pydicom.uid.JPEG2000Lossless
    from hygeia.data.io import load_image

    np.testing.assert_array_equal(load_image(stored[j2k.SOPInstanceUID]).pixels, load_image(phantom).pixels)
    # rejections are logged without patient data
    text = caplog.text
    assert "rejected instance" in text
    for phi in (str(good.PatientName), str(good.PatientID), good.StudyInstanceUID):
        if phi:
            assert phi not in text


def test_pacs_unreachable_ends_in_failure_record(cnn, phantom, tmp_path):
    """A study whose SR cannot be delivered within give_up_after_s gets an explicit failure record."""
    from hygeia_pacs import Gateway

    cfg = _config(tmp_path, give_up_after_s=4.0)
    with Gateway(cfg, diagnoser=cnn) as gw:
        assert subprocess.run(["storescu", "-aet", SCU, "-aec", AET, "127.0.0.1", str(cfg.port),
                               str(phantom)], capture_output=True).returncode == 0
        assert gw.wait_idle(60), gw.status()
    (record_path,) = list((cfg.spool / "failed").glob("*.json"))
    record = json.loads(record_path.read_text())
    assert record["status"] == "failed" and record["attempts"] >= 2
    assert "gave up" in record["reason"] and "association" in record["reason"]
    job = cfg.spool / "failed" / record_path.stem
    assert (job / "sr.dcm").exists() and list((job / "instances").glob("*.dcm"))  # kept for a later resend
    assert not list((cfg.spool / "done").glob("*.json"))


def test_spool_is_durable_and_resumable(tmp_path):
    from hygeia_pacs.spool import Spool

    sp = Spool(tmp_path)
    sp.store("1.2.3", "1.2.3.4", b"DICM-bytes")
    sp.store("1.2.3", "1.2.3.5", b"more")
    assert sp.close_idle(timeout_s=60) == []  # still open
    sp2 = Spool(tmp_path)  # a restart: the open study is known again from its files
    assert set(sp2.open_studies()) == {"1.2.3"}
    (job,) = sp2.close_idle(timeout_s=0.0, now=time.time() + 1)
    assert sorted(p.name for p in (job / "instances").iterdir()) == ["1.2.3.4.dcm", "1.2.3.5.dcm"]
    assert Spool(tmp_path).jobs() == [job] and Spool(tmp_path).state(job)["attempts"] == 0
    with pytest.raises(ValueError):
        sp2.store("../../etc", "1", b"x")  # UIDs become file names: only digits and dots


def test_crash_after_done_record_is_cleaned_not_resent(tmp_path):
    """A crash between the done record and the clean-up: the restart cleans up, builds no second SR."""
    from hygeia_pacs import Gateway
    from hygeia_pacs.spool import write_json

    cfg = _config(tmp_path)
    gw = Gateway(cfg, diagnoser=object())  # not started: process() is called directly
    gw.spool.store("1.2.3", "1.2.3.4", b"x")
    (job,) = gw.spool.close_idle(timeout_s=0.0, now=time.time() + 1)
    (job / "sr.dcm").write_bytes(b"the SR")
    write_json(gw.spool.done / f"{job.name}.json", {"status": "done"})  # ... and then the crash
    assert gw.process(job, gw.spool.state(job)) == 0
    assert not job.exists() and (gw.spool.done / f"{job.name}.sr.dcm").read_bytes() == b"the SR"
    assert gw.counters["sent"] == 0 and gw.counters["retries"] == 0


def test_config_validation(tmp_path):
    from hygeia_pacs import GatewayConfig

    base = {"spool": str(tmp_path), "cstore": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}
    with pytest.raises(InputError, match="allowed_callers"):
        GatewayConfig.from_dict(base)
    with pytest.raises(InputError, match="unknown"):
        GatewayConfig.from_dict({**base, "allowed_callers": ["A"], "colour": "red"})
    with pytest.raises(InputError, match="destination"):
        GatewayConfig.from_dict({"spool": str(tmp_path), "allowed_callers": ["A"]})
    (tmp_path / "g.json").write_text(json.dumps({**base, "allowed_callers": ["A"], "spool": "q"}))
    cfg = GatewayConfig.load(tmp_path / "g.json")
    assert cfg.spool == tmp_path / "q" and cfg.cstore.port == 104
    assert np.isfinite(cfg.study_timeout_s)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InputError, match="workers"):
            GatewayConfig.from_dict({**base, "allowed_callers": ["A"], "workers": bad})
    assert GatewayConfig.from_dict({**base, "allowed_callers": ["A"]}).workers == 2
    for bad in (-1, 1.5, True):
        with pytest.raises(InputError, match="sr_processes"):
            GatewayConfig.from_dict({**base, "allowed_callers": ["A"], "sr_processes": bad})
    # each value has its field's kind: a string where a list is meant is not split into letters
    ok = {**base, "allowed_callers": ["PACS"]}
    for key, bad, why in [("allowed_callers", "PACS", "a list of strings"), ("modalities", "DX", "a list of strings"),
                          ("port", "abc", "an integer"), ("port", 70000, "a TCP port"), ("spool", 5, "text"),
                          ("study_timeout_s", "abc", "a number"), ("tls", 5, "a JSON object"),
                          ("cstore", {"host": "x"}, "cstore: expected the key ae_title"),
                          ("stow", {}, "stow: expected the key url"),
                          ("transfer_syntaxes", ["bogus"], "transfer syntax UIDs"),
                          ("server", "notaport", "HOST:PORT")]:
        with pytest.raises(InputError, match=why):
            GatewayConfig.from_dict({**ok, key: bad})
    assert GatewayConfig.from_dict({**ok, "server": "triton:8001"}).allowed_callers == ("PACS",)


def test_command_line_overrides_server_and_local_fallback(tmp_path):
    from hygeia_pacs.cli import load_config

    base = {"spool": "q", "allowed_callers": ["A"], "cstore": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}
    (tmp_path / "g.json").write_text(json.dumps(base))
    plain = load_config(tmp_path / "g.json")
    assert plain.server is None and plain.local_fallback is False
    cfg = load_config(tmp_path / "g.json", server="10.0.0.5:8001", local_fallback=True)
    assert cfg.server == "10.0.0.5:8001" and cfg.local_fallback is True
    with pytest.raises(InputError, match="server"):
        load_config(tmp_path / "g.json", server="notaport")
    (tmp_path / "f.json").write_text(json.dumps({**base, "local_fallback": True}))
    assert load_config(tmp_path / "f.json").local_fallback is True  # the flag only turns it on


def test_dead_sr_process_is_replaced_and_the_study_retried(cnn, phantom, tmp_path):
    """sr_processes: an SR process that dies fails that attempt (retried later), the pool is
    replaced, and the next attempt builds the SR."""
    import io
    import os
    import signal
    from concurrent.futures.process import BrokenProcessPool

    from hygeia_pacs import Gateway

    ds = pydicom.dcmread(phantom)
    gw = Gateway(_config(tmp_path, sr_processes=1), diagnoser=cnn)
    gw.spool.store(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), phantom.read_bytes())
    (job,) = gw.spool.close_idle(0.0, now=time.time() + 1)
    gw._start_sr_pool()
    try:
        first = gw._sr_pool
        for pid in list(first._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            gw.make_sr(job)
        assert gw._sr_pool is not first  # replaced
        data, info = gw.make_sr(job)
        sr = pydicom.dcmread(io.BytesIO(data))
        assert sr.SOPInstanceUID == info["sop_instance_uid"] and sr.StudyInstanceUID == ds.StudyInstanceUID
        assert info["groups"] == len(cnn.findings)
    finally:
        gw._sr_pool.shutdown()


def test_failed_study_is_listed_and_retry_queues_it_again(tmp_path):
    """`hygeia gateway status` lists a failure record; `hygeia gateway retry` puts the job back."""
    from hygeia_pacs.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.store("1.2.3", "1.2.3.4", b"DICM")
    job, = spool.close_idle(0.0, now=1e12)
    spool.fail(job, {"study": "study#abc", "reason": "PermanentError: refused", "attempts": 3})
    assert spool.summary()["failed"] == 1 and spool.jobs() == []
    assert spool.failures() == [{"job": job.name, "study": "study#abc", "reason": "PermanentError: refused",
                                 "attempts": 3, "time": None}]
    assert spool.retry_failed() == 1
    again, = spool.jobs()
    assert again.name == job.name and (again / "instances" / "1.2.3.4.dcm").read_bytes() == b"DICM"
    assert spool.state(again)["attempts"] == 0 and spool.summary()["failed"] == 0
