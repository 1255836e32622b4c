"""The gateway's pipeline against a real Orthanc with dcmtk's storescu: studies that close together
share diagnose() calls, a study the diagnoser refuses fails alone without taking its batch with
it, and each sender's kept association carries several SRs."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from hygeia.errors import InputError
from orthanc import Orthanc, orthanc_bin  # noqa: F401  (fixture)
from test_gateway import dicomweb, done_records, gateway_config, phantom_study, storescu, wait_for

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not shutil.which("storescu"), reason="needs dcmtk (storescu)")]


class RefusesBlankImages:
    """A diagnoser (the cnn) that refuses a blank image as bad input, as a careful plugin would;
    it records the images of each call."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    @property
    def input_size(self):
        return self.inner.input_size

    def diagnose(self, images, texts=None):
        self.calls.append(len(images))
        if any(float(np.ptp(im)) == 0.0 for im in images):
            raise InputError("image", "an image with some contrast", got="a blank image")
        return self.inner.diagnose(images, texts=texts)


def blank_study(folder: Path, seed: int) -> list[Path]:
    files = phantom_study(folder, seed=seed, n=1)
    ds = pydicom.dcmread(files[0])
    ds.PixelData = bytes(len(ds.PixelData))  # all zero: decodes, but shows nothing
    ds.save_as(files[0])
    return files


def test_shared_batch_bad_study_fails_alone_and_senders_keep_associations(orthanc_bin, tmp_path, caplog):
    import logging

    import hygeia
    from hygeia_pacs import Gateway, GatewayConfig

    good = [phantom_study(tmp_path / f"s{k}", seed=600 + k, n=1 + k % 2) for k in range(5)]
    bad = blank_study(tmp_path / "blank", seed=699)
    good_uids = {str(pydicom.dcmread(f[0]).StudyInstanceUID) for f in good}
    diag = RefusesBlankImages(hygeia.create("diagnoser", "cnn"))
    o = Orthanc(tmp_path / "orthanc").start()
    try:
        cfg = GatewayConfig.from_dict(gateway_config(tmp_path, o, study_timeout_s=0.3, stow=None, workers=2,
                                                     batch_size=16))
        caplog.set_level(logging.INFO)
        offset = [-3600.0]  # the gateway's clock: no study closes until every one has arrived
        with Gateway(cfg, diagnoser=diag, clock=lambda: time.time() + offset[0]) as gw:
            assert storescu(cfg.port, [f for files in good for f in files] + bad).returncode == 0
            offset[0] = 10.0  # now all six are idle at once: they close in one pass, one batch
            wait_for(lambda: gw.status()["done"] == 5 and gw.status()["failed"] == 1, 120, "5 SRs and 1 failure")
            assert gw.wait_idle(60), gw.status()
        assert diag.calls[0] == 8  # the six studies (8 images) in one call, refused; then each study alone
        assert sorted(diag.calls[1:]) == sorted(len(f) for f in [*good, bad])
        (failure,) = [json.loads(p.read_text()) for p in (cfg.spool / "failed").glob("*.json")]
        assert "InputError" in failure["reason"] and "blank" in failure["reason"]
        records = done_records(cfg.spool)
        assert {r["study_uid"] for r in records} == good_uids and len(records) == 5
        assert any(r["timings_s"]["batch_images"] > 1 for r in records)
        srs = dicomweb(o).search_for_instances(search_filters={"Modality": "SR"}, fields=["StudyInstanceUID"])
        assert sorted(i["0020000D"]["Value"][0] for i in srs) == sorted(good_uids)  # one SR each, none for the blank
        requested = [r for r in caplog.records if r.name.startswith("pynetdicom") and r.getMessage() == "Requesting Association"]
        assert 1 <= len(requested) < len(records)  # SRs shared the senders' associations
        ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("hygeia_pacs"))
        assert "FAILED" in ours and "InputError" in ours
        for files in [*good, bad]:  # no patient data, no UID in the gateway's log lines
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            for phi in (str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID)):
                assert not phi or phi not in ours
    finally:
        o.stop()
