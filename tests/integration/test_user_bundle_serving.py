"""A model trained on the user's labels, served by the real tritonserver: `hygeia triton build
--bundle cnn=B` copies the bundle into the repository and the served model reports its findings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")


@pytest.mark.integration
def test_served_user_bundle_reports_the_users_findings(tmp_path: Path):
    from hygeia.plugins import get_registry
    from hygeia.serving import connect
    from hygeia.serving.repository import build_repository
    from hygeia.serving.server import TritonServer
    from hygeia_cnn.train import train
    from hygeia_lab.export import export_phantoms

    labels = export_phantoms(tmp_path / "data", layout="chexpert", n=32, size=64, image_format="png", progress=False)
    bundle = train(tmp_path / "B", progress=False, data=labels, epochs=1, size=64, workers=0, threads=1)
    findings = json.loads((bundle / "config.json").read_text())["findings"]
    res = build_repository(tmp_path / "repo", names=["cnn"], runtime="eager", bundles={"cnn": bundle})
    assert res.written == ["diagnoser_cnn"] and not res.failed
    assert (tmp_path / "repo" / "diagnoser_cnn" / "bundle" / "model.safetensors").is_file()
    local = get_registry().create_from_bundle("diagnoser", "cnn", bundle, heatmaps=False)
    images = np.random.default_rng(0).random((3, 1, 64, 64), dtype=np.float32)
    want = local.predict_proba(images)
    with TritonServer(tmp_path / "repo", threads=1, startup_timeout=180) as srv:
        remote = connect("diagnoser", "cnn", srv.grpc_url, timeout=60)
        assert list(remote.findings) == findings
        out = remote.diagnose(images, heatmaps=False)
    assert [f.label for f in out[0].findings] == findings
    assert out[0].findings[findings.index("Pleural Effusion")].code.value == "60046008"
    got = np.array([[f.probability for f in d.findings] for d in out])
    assert np.abs(got - want).max() < 1e-4
    with pytest.raises(Exception, match="nosuch"):
        build_repository(tmp_path / "repo2", bundles={"nosuch": bundle})
