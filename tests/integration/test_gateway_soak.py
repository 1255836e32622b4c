"""Sustained load through the gateway: a real listener, the cnn, SR processes, a real Orthanc.

The same load run as ``benchmarks/gateway.py`` (which sends 1,000 studies): here
``HYGEIA_SOAK_STUDIES`` studies (150 by default, ~20 s on 2 cores), one image each, sent by dcmtk
``storescu`` in runs of 25 studies. Every acknowledged study must end with exactly one SR in
Orthanc (0 lost, 0 duplicates, no failure record), and the gateway's resident memory (its
process and its SR processes) must stay flat: less than 10 % growth from the end of the warm-up
to the end of the run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from orthanc import Orthanc, orthanc_bin  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not shutil.which("storescu"), reason="needs dcmtk (storescu)")]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gateway.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("hygeia_bench_gateway", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_sustained_load_loses_nothing_and_memory_stays_flat(orthanc_bin, tmp_path):
    import hygeia
    from hygeia_pacs import Gateway

    bench = load_bench()
    n = int(os.environ.get("HYGEIA_SOAK_STUDIES", "150"))
    warmup = max(10, n // 5)
    studies = bench.write_studies(tmp_path / "studies", n, per_study=1, seed0=7000)
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        cfg = bench.gateway_config(tmp_path / "spool", orthanc, sr_processes=1, workers=4)
        with Gateway(cfg, diagnoser=hygeia.create("diagnoser", "cnn")) as gw:
            res = bench.run_load(gw, orthanc, studies, chunk=25, warmup=warmup, timeout=600)
            status = gw.status()
    finally:
        orthanc.stop()
    counts = {k: getattr(res, k) for k in ("sent", "acknowledged", "delivered", "failures", "duplicates", "lost")}
    assert counts == {"sent": n, "acknowledged": n, "delivered": n, "failures": 0, "duplicates": 0, "lost": 0}, counts
    assert status["sent"] == n and status["failed"] == 0 and status["processing"] == 0
    assert res.rss_warm_mb > 0 and res.rss_growth < 0.10, (res.rss_warm_mb, res.rss_end_mb, res.rss_samples_mb)
    batches = [json.loads(p.read_text())["timings_s"].get("batch_images", 0) for p in (cfg.spool / "done").glob("*.json")]
    assert max(batches) > 1  # under load, one diagnose() call takes several studies' images
