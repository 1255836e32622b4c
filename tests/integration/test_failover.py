"""Two real tritonservers from one repository; the remote client spreads requests over both and
loses none when one is killed mid-run."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")


@pytest.mark.integration
def test_two_servers_one_killed_mid_run_loses_no_request(triton_repo: Path, require_model):
    from hygeia.plugins import get_registry
    from hygeia.serving import connect
    from hygeia.serving.server import TritonServer
    from hygeia_lab import make_phantom_set

    from hygeia.serving.binary import shm_regions

    require_model("diagnoser_cnn")
    regions_before = shm_regions()
    images = make_phantom_set(8, "test", size=64).images
    expected = [d.to_dict()["findings"] for d in get_registry().create("diagnoser", "cnn").diagnose(images)]
    with TritonServer(triton_repo, threads=1, startup_timeout=180) as a, \
            TritonServer(triton_repo, threads=1, startup_timeout=180) as b:
        remote = connect("diagnoser", "cnn", f"{a.grpc_url},{b.grpc_url}", timeout=30, cooldown=30)
        answered, failed = [], []
        killed = threading.Event()

        def kill_a_soon() -> None:
            while len(answered) < 10:
                time.sleep(0.01)
            os.killpg(a.proc.pid, signal.SIGKILL)
            killed.set()

        threading.Thread(target=kill_a_soon, daemon=True).start()
        for i in range(40):
            try:
                out = remote.diagnose(images[i % 8: i % 8 + 1], heatmaps=False)
                answered.append((i, out[0]))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failed.append((i, repr(exc)))
        assert killed.is_set(), "the first server was never killed"
        assert not failed, failed
        assert len(answered) == 40
        for i, d in answered:  # every answer is the model's, whichever replica gave it
            got = {f["label"]: f["probability"] for f in d.to_dict()["findings"]}
            want = {f["label"]: f["probability"] for f in expected[i % 8]}
            assert got.keys() == want.keys()
            assert max(abs(got[k] - want[k]) for k in got) < 1e-4
        assert remote.conn.describe()[a.grpc_url]["cooling_down_s"] > 0  # the dead one is set aside
    # the killed server's Python-backend regions are removed from /dev/shm when it is stopped
    assert not shm_regions() - regions_before, sorted(shm_regions() - regions_before)
