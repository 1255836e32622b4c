"""DICOM throughput, measured side by side in one run on this machine.

1. SR writing: TID 1500 SRs per second written by Hygeia (``hygeia_dicom.sr.build_sr`` + PS3.10
   encoding) vs a bare highdicom build of the same content (same groups, codes, region, evidence,
   encoding) written directly against highdicom's API. Target ratio >= 0.9.
2. Gateway: studies per second end to end (storescu -> gateway -> cnn -> SR -> C-STORE into a
   real Orthanc, until the last SR is stored) vs the diagnoser alone on the same studies
   (``diagnose()`` on the prepared images, one call per study). Target ratio >= 0.8.

    python benchmarks/dicom.py                 # both
    python benchmarks/dicom.py --only sr --n 40
    python benchmarks/dicom.py --json

Needs the Debian packages dcmtk and orthanc (gateway part).
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _encode(ds: Any) -> bytes:
    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def bare_highdicom_sr(diagnosis: Any, src: Any) -> Any:
    """The same TID 1500 content built straight with highdicom (the reference)."""
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    m = diagnosis.model
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=m.name, manufacturer_name="Hygeia", model_name=f"{m.name} {m.version}"))
    groups = []
    for n, f in enumerate(diagnosis.findings, start=1):
        algo = hd.sr.AlgorithmIdentification(
            name=m.name, version=m.version, manufacturer="Hygeia",
            parameters=[f"weights_sha256={m.weights_sha256}", "input_size=64x64", f"threshold={f.threshold:g}"],
            family=codes.cid7162.ArtificialIntelligence)
        concept = CodedConcept(f.code.value, f.code.scheme, f.code.meaning)
        common = dict(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"{f.label} #{n}"),
            finding_type=concept, algorithm_id=algo,
            measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=round(float(f.probability), 6),
                                            unit=CodedConcept("1", "UCUM", "no units"))],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=concept, value=codes.SCT.Present if f.present else codes.SCT.Absent)])
        if f.region is not None:
            sy, sx = src.Rows / diagnosis.image_size[0], src.Columns / diagnosis.image_size[1]
            xy = np.asarray(f.region.coords, np.float64) * [sx, sy]
            gtype = "POINT" if f.region.kind == "point" else "POLYLINE"
            if f.region.kind == "box":
                (x0, y0), (x1, y1) = xy
                xy = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
            data = xy.astype(np.float32)
            region = hd.sr.ImageRegion(graphic_type=gtype, graphic_data=data,
                                       source_image=hd.sr.SourceImageForRegion(src.SOPClassUID, src.SOPInstanceUID))
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                source_images=[hd.sr.SourceImageForMeasurementGroup(src.SOPClassUID, src.SOPInstanceUID)], **common))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CodedConcept("363680008", "SCT", "Radiographic imaging procedure"),
        imaging_measurements=groups, referenced_images=[src])
    equipment = hd.ContributingEquipment(manufacturer="Hygeia", purpose_of_reference=codes.DCM.ProcessingEquipment,
                                         manufacturer_model_name=m.name, software_versions=[m.version])
    return hd.sr.Comprehensive3DSR(
        evidence=[src], content=report, series_instance_uid=generate_uid(), series_number=9001,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="Hygeia", manufacturer_model_name=m.name,
        is_complete=True, is_final=False, is_verified=False, series_description="Hygeia AI findings - NOT VERIFIED",
        contributing_equipment=[equipment])


def bench_sr(n: int) -> dict[str, Any]:
    import hygeia
    from hygeia.data.io import load_image, prepare_image
    from hygeia_lab import write_phantom_dicom
    from hygeia_dicom.sr import build_sr

    tmp = Path(tempfile.mkdtemp(prefix="hygeia-bench-sr-"))
    cnn = hygeia.create("diagnoser", "cnn")
    # a phantom with a located finding, so both sides write a SCOORD too
    for seed in range(11, 60):
        li = load_image(write_phantom_dicom(tmp / f"{seed}.dcm", seed=seed))
        (diagnosis,) = cnn.diagnose(prepare_image(li.pixels, cnn.input_size)[None])
        if any(f.region is not None for f in diagnosis.findings):
            break
    src = li.dataset
    for _ in range(2):  # warm-up both
        _encode(build_sr([diagnosis], [src]))
        _encode(bare_highdicom_sr(diagnosis, src))
    t_h, t_b = [], []
    for _ in range(n):  # interleaved, so machine load hits both alike
        t0 = time.perf_counter()
        _encode(build_sr([diagnosis], [src]))
        t1 = time.perf_counter()
        _encode(bare_highdicom_sr(diagnosis, src))
        t2 = time.perf_counter()
        t_h.append(t1 - t0)
        t_b.append(t2 - t1)
    h, b = 1.0 / statistics.median(t_h), 1.0 / statistics.median(t_b)
    return {"name": "SR write (TID 1500)", "unit": "SR/s", "hygeia": h, "reference": b, "ratio": h / b,
            "target": 0.9, "reference_is": "bare highdicom build of the same content", "n": n}


def bench_gateway(n_studies: int, per_study: int, workers: int = 2, sr_processes: int = 2,
                  sender_nagle: bool = False) -> list[dict[str, Any]]:
    import os
    import subprocess

    import hygeia
    from hygeia.data.io import load_image, prepare_image
    from hygeia_lab import write_phantom_study
    from hygeia_pacs import Gateway, GatewayConfig

    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from orthanc import Orthanc, free_port  # the test suite's Orthanc launcher

    tmp = Path(tempfile.mkdtemp(prefix="hygeia-bench-gw-"))
    studies = [write_phantom_study(tmp / f"study{k}", n=per_study, seed=1000 + k) for k in range(n_studies)]
    cnn = hygeia.create("diagnoser", "cnn")
    # the diagnoser alone: one diagnose() per study on its prepared images
    batches = [np.stack([prepare_image(load_image(p).pixels, cnn.input_size) for p in files]) for files in studies]
    cnn.diagnose(batches[0])  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        cnn.diagnose(b)
    diag_rate = n_studies / (time.perf_counter() - t0)

    # the same work in-process, without the gateway (no DIMSE, no queue, no fsync): read, diagnose, SR
    import pydicom

    from hygeia.data.io import load_dataset
    from hygeia_dicom.sr import build_sr

    t0 = time.perf_counter()
    for files in studies:
        datasets = [pydicom.dcmread(p) for p in files]
        batch = np.stack([prepare_image(load_dataset(d).pixels, cnn.input_size) for d in datasets])
        _encode(build_sr(cnn.diagnose(batch), datasets))
    inproc_rate = n_studies / (time.perf_counter() - t0)

    orthanc = Orthanc(tmp / "orthanc").start()
    try:
        timeout_s = 0.5
        # the sending modality (dcmtk storescu): Nagle's algorithm off unless --sender-nagle; with it
        # on (dcmtk's default) each instance waits ~45 ms for a delayed ACK, whoever receives it
        sender_env = {**os.environ, "TCP_NODELAY": "0" if sender_nagle else "1"}
        cfg = GatewayConfig(spool=tmp / "spool", port=free_port(), allowed_callers=("STORESCU",),
                            study_timeout_s=timeout_s, poll_s=0.02, workers=workers, sr_processes=sr_processes,
                            cstore={"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port})
        with Gateway(cfg, diagnoser=cnn) as gw:
            warm = write_phantom_study(tmp / "warm", n=1, seed=999)  # warm-up: imports, first association
            subprocess.run(["storescu", "-aet", "STORESCU", "-aec", cfg.ae_title, "127.0.0.1", str(cfg.port),
                            *map(str, warm)], check=True, capture_output=True, env=sender_env)
            gw.wait_idle(120)
            done0 = gw.status()["done"]
            t0 = time.perf_counter()
            subprocess.run(["storescu", "-aet", "STORESCU", "-aec", cfg.ae_title, "127.0.0.1", str(cfg.port),
                            *[str(p) for files in studies for p in files]], check=True, capture_output=True,
                           env=sender_env)
            t_sent = time.perf_counter()
            while gw.status()["done"] - done0 < n_studies:
                time.sleep(0.01)
            elapsed = time.perf_counter() - t0
            assert gw.status()["failed"] == 0
    finally:
        orthanc.stop()
    gw_rate = n_studies / elapsed
    records = [json.loads(p.read_text()) for p in (tmp / "spool" / "done").glob("*.json")]
    records = [r for r in records if r.get("timings_s")][-n_studies:]
    breakdown = {k: round(statistics.mean(r["timings_s"].get(k, 0.0) for r in records), 3)
                 for k in ("read_s", "diagnose_s", "sr_s", "send_s")}
    common = {"unit": "studies/s", "hygeia": gw_rate, "n_studies": n_studies, "images_per_study": per_study,
              "workers": workers, "sr_processes": sr_processes, "sender_nagle": sender_nagle,
              "study_timeout_s": timeout_s, "storescu_s": round(t_sent - t0, 3), "elapsed_s": round(elapsed, 3),
              "per_study_breakdown_s": breakdown}
    return [
        {"name": "gateway end to end", **common, "reference": diag_rate, "ratio": gw_rate / diag_rate,
         "target": 0.8, "reference_is": "cnn.diagnose() alone, one call per study"},
        {"name": "gateway overhead", **common, "reference": inproc_rate, "ratio": gw_rate / inproc_rate,
         "target": None, "reference_is": "read + diagnose + SR build in-process, no gateway"},
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["sr", "gateway"])
    ap.add_argument("--n", type=int, default=20, help="SRs per side")
    ap.add_argument("--studies", type=int, default=30)
    ap.add_argument("--per-study", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="gateway config: studies processed at once")
    ap.add_argument("--sr-processes", type=int, default=2, help="gateway config: SR-building processes (0: none)")
    ap.add_argument("--sender-nagle", action="store_true",
                    help="leave Nagle's algorithm on in the sending storescu (dcmtk's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    results = []
    if args.only in (None, "sr"):
        results.append(bench_sr(args.n))
    if args.only in (None, "gateway"):
        results.extend(bench_gateway(args.studies, args.per_study, args.workers, args.sr_processes,
                                     args.sender_nagle))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'benchmark':<22} {'hygeia':>12} {'reference':>12} {'ratio':>7} {'target':>7}  reference")
    for r in results:
        ok = "" if r["target"] is None else " [ok]" if r["ratio"] >= r["target"] else " [BELOW]"
        target = "-" if r["target"] is None else f">= {r['target']}"
        print(f"{r['name']:<22} {r['hygeia']:>8.2f} {r['unit']:<10}{r['reference']:>8.2f} {r['unit']:<10}"
              f"{r['ratio']:>6.2f} {target:>7}  {r['reference_is']}{ok}")
    for r in results:
        if "per_study_breakdown_s" in r:
            print(f"gateway: {r['n_studies']} studies of {r['images_per_study']} images, workers {r['workers']}, "
                  f"sr_processes {r['sr_processes']}, sender Nagle {'on' if r['sender_nagle'] else 'off'}")
            print(f"gateway time per study (s): {r['per_study_breakdown_s']}; storescu of all studies took "
                  f"{r['storescu_s']} s, last SR stored after {r['elapsed_s']} s")
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
