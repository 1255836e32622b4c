"""The PACS gateway under load, measured against the diagnoser alone in one run on this machine.

1. Throughput: ``--studies`` phantom studies (``hygeia_lab.write_phantom_study``) sent with dcmtk's
   ``storescu`` to the gateway (its real DICOM listener, a local diagnoser: ``--diagnoser``, by default the
   default diagnoser ``cxr``, SRs sent by
   C-STORE into a real Orthanc started like the integration tests start it). End to end = first
   instance sent -> last SR stored in Orthanc, in studies/s and images/s, beside the diagnoser's own
   in-process throughput on the same images at its best batch size (measured before and after the
   gateway run; the better of the two is the reference). Target: ratio >= 0.8.
2. Sustained load: ``--soak`` studies sent in ``storescu`` runs of ``--chunk`` studies; prints
   sent / acknowledged / delivered / failures / duplicates / lost, and the gateway's RSS (its
   process and its SR processes) after the warm-up and at the end.

    python benchmarks/gateway.py                      # 200 studies, then a 1,000-study soak
    python benchmarks/gateway.py --studies 200 --soak 0 --json
    python benchmarks/gateway.py --studies 0 --soak 1000 --sr-processes 1
    python benchmarks/gateway.py --studies 200 --soak 0 --triton   # the diagnoser on a local tritonserver

With ``--triton`` the diagnoser is built into a Triton repository and served by a local
tritonserver; the gateway and the reference both call it through ``RemoteDiagnoser`` (the gateway
asks for regions without maps, ``heatmaps="regions"``), so the ratio is the gateway against the
served diagnoser on the same machine.

``run_load`` is also what ``tests/integration/test_gateway_soak.py`` runs (with fewer studies).
Needs the Debian packages dcmtk and orthanc.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCU = "STORESCU"


def rss_mb(pids: list[int]) -> float:
    """Resident memory (VmRSS) of these processes together, in MiB (Linux /proc)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def cpu_s(pid: int, task: bool = False) -> float:
    """User + system CPU seconds of a process (or, ``task``: of a thread of this process) so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/self/task/{pid}/stat" if task else f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds so far of this process's live threads, by thread name without its number
    (``hygeia-gateway-sender-2`` -> ``hygeia-gateway-sender``; Linux /proc/self/task)."""
    import re
    import threading

    out: dict[str, float] = {}
    for t in threading.enumerate():
        name = re.sub(r"[-@ ]?\(?[\d]+.*$", "", t.name) or t.name
        out[name] = out.get(name, 0.0) + cpu_s(t.native_id or 0, task=True)
    return out


TRITON: list[Any] = []  # the tritonserver serving the diagnoser (--triton)


def cpu_now(gw: Any, orthanc: Any) -> dict[str, float]:
    """CPU seconds so far: the gateway's process, its SR processes, Orthanc, finished children
    (storescu), and with ``--triton`` the tritonserver with its stubs."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"gateway": me.ru_utime + me.ru_stime, "sr_processes": sum(cpu_s(p) for p in gateway_pids(gw)[1:]),
           "orthanc": cpu_s(orthanc.proc.pid) if orthanc.proc is not None else 0.0,
           "storescu": kids.ru_utime + kids.ru_stime}
    if TRITON:  # the server and its Python-backend stubs
        srv = TRITON[0]
        out["triton"] = sum(cpu_s(p) for p in (srv.proc.pid, *(p for ps in srv.stubs().values() for p in ps)))
    return out


def gateway_pids(gw: Any) -> list[int]:
    """The gateway's own process and its SR processes."""
    pool = getattr(gw, "_sr_pool", None)
    return [os.getpid(), *(list(getattr(pool, "_processes", {}) or {}) if pool is not None else [])]


def write_studies(folder: Path, n: int, per_study: int, seed0: int = 5000) -> list[list[Path]]:
    from hygeia_lab import write_phantom_study

    return [[Path(p) for p in write_phantom_study(folder / f"s{k}", n=per_study, seed=seed0 + k)] for k in range(n)]


def storescu(port: int, files: list[Path], aec: str = "HYGEIA") -> subprocess.CompletedProcess:
    """dcmtk storescu with Nagle's algorithm off (TCP_NODELAY=1, see docs/gateway.md)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(["storescu", "-aet", SCU, "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=600, env=env)


def diagnoser_rate(diagnoser: Any, files: list[Path], batches=(1, 2, 4, 8, 16, 32, 64),
                   seconds: float = 1.0, sample: int = 32) -> dict[str, Any]:
    """The diagnoser's own images/s in-process on these images (prepared once), per batch size,
    asked for what the gateway asks it for (heat maps of present findings only, where it can).

    The cost then depends on each image's findings, so every batch size runs through the same
    ``sample`` images in turn (consecutive batches, wrapping round) for at least ``seconds`` and at
    least once through all of them: the same mix of findings the gateway sees."""
    from hygeia.data.io import load_image, prepare_image
    from hygeia_pacs.gateway import diagnose_options

    kw = diagnose_options(diagnoser)
    images = np.stack([prepare_image(load_image(p).pixels, diagnoser.input_size) for p in files[:sample]])
    rates = {}
    for bs in batches:
        chunks = [np.take(images, range(i, i + bs), axis=0, mode="wrap") for i in range(0, len(images), bs)]
        diagnoser.diagnose(chunks[0], **kw)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < len(images):
            diagnoser.diagnose(chunks[(n // bs) % len(chunks)], **kw)
            n += bs
        rates[bs] = n / (time.perf_counter() - t0)
    best = max(rates, key=rates.get)
    return {"images_per_s": rates[best], "best_batch": best, "per_batch": {k: round(v, 1) for k, v in rates.items()}}


def sr_studies(orthanc: Any) -> list[str]:
    """Study Instance UID of every SR instance stored in Orthanc (QIDO-RS), one entry per instance."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from orthanc import PASSWORD, USER

    client = DICOMwebClient(url=orthanc.dicomweb_url, session=create_session_from_user_pass(USER, PASSWORD))
    found = client.search_for_instances(search_filters={"Modality": "SR"}, fields=["StudyInstanceUID"])
    return [i["0020000D"]["Value"][0] for i in found]


@dataclass
class LoadResult:
    """What one load run counted (studies unless said otherwise)."""

    sent: int = 0
    acknowledged: int = 0  # studies whose every instance got a success status from the gateway
    delivered: int = 0  # distinct sent studies with an SR in Orthanc
    failures: int = 0  # failure records in the spool
    duplicates: int = 0  # SRs beyond one per study (in Orthanc or in the done records)
    lost: int = 0  # acknowledged, yet neither an SR in Orthanc nor a failure record
    images: int = 0
    elapsed_s: float = 0.0  # first instance sent -> last SR stored
    storescu_s: float = 0.0
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_max_mb: float = 0.0
    rss_samples_mb: list[float] = field(default_factory=list)
    cpu_ms_per_study: dict[str, float] = field(default_factory=dict)
    gateway_threads_cpu_ms_per_study: dict[str, float] = field(default_factory=dict)  # live threads, by name

    @property
    def studies_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def rss_growth(self) -> float:
        return (self.rss_end_mb - self.rss_warm_mb) / self.rss_warm_mb if self.rss_warm_mb else 0.0


def _wait_done(gw: Any, target: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while gw.counters["sent"] + gw.counters["failed"] < target:
        if time.monotonic() > end:
            raise TimeoutError(f"gateway still busy after {timeout:.0f} s: {gw.status()}")
        time.sleep(0.01)


def run_load(gw: Any, orthanc: Any, studies: list[list[Path]], chunk: int = 0, warmup: int = 0,
             timeout: float = 1800.0) -> LoadResult:
    """Send ``studies`` to a started gateway with storescu and count what arrived in ``orthanc``.

    ``chunk``: studies per storescu run (0: one run). ``warmup``: the first studies are sent and
    processed before the RSS baseline is taken (they count like the others). The clock runs from
    the first storescu run to the last SR stored.
    """
    import pydicom

    res = LoadResult(sent=len(studies), images=sum(map(len, studies)))
    uids = [str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID) for files in studies]
    base_done = gw.counters["sent"] + gw.counters["failed"]
    chunk = chunk or len(studies)
    runs = ([studies[:warmup]] if warmup else []) + [studies[i:i + chunk] for i in range(warmup, len(studies), chunk)]
    acked, t0, sent_so_far, cpu0, thr0 = 0, time.perf_counter(), 0, cpu_now(gw, orthanc), thread_cpu_s()
    for k, run in enumerate(runs):
        before = gw.counters["accepted"]
        r = storescu(gw.config.port, [f for files in run for f in files], aec=gw.config.ae_title)
        got = gw.counters["accepted"] - before
        acked += len(run) if r.returncode == 0 and got == sum(map(len, run)) else 0
        sent_so_far += len(run)
        if k == 0 and warmup:
            _wait_done(gw, base_done + sent_so_far, timeout)
            res.rss_warm_mb = rss_mb(gateway_pids(gw))
        else:
            res.rss_samples_mb.append(round(rss_mb(gateway_pids(gw)), 1))
    res.storescu_s = time.perf_counter() - t0
    _wait_done(gw, base_done + len(studies), timeout)
    res.elapsed_s = time.perf_counter() - t0
    res.cpu_ms_per_study = {k: round(1000 * (v - cpu0[k]) / len(studies), 1) for k, v in cpu_now(gw, orthanc).items()}
    res.gateway_threads_cpu_ms_per_study = {k: round(1000 * (v - thr0.get(k, 0.0)) / len(studies), 1)
                                            for k, v in sorted(thread_cpu_s().items(), key=lambda kv: -kv[1])}
    res.rss_end_mb = rss_mb(gateway_pids(gw))
    res.rss_max_mb = max([res.rss_end_mb, *res.rss_samples_mb])
    res.acknowledged = acked
    in_orthanc = [u for u in sr_studies(orthanc) if u in set(uids)]
    records = [json.loads(p.read_text()) for p in gw.spool.done.glob("*.json")]
    done_uids = [r["study_uid"] for r in records if r.get("study_uid") in set(uids)]
    res.delivered = len(set(in_orthanc))
    res.failures = len([p for p in gw.spool.failed.glob("*.json")])
    res.duplicates = (len(in_orthanc) - len(set(in_orthanc))) + (len(done_uids) - len(set(done_uids)))
    res.lost = max(0, res.acknowledged - res.delivered - res.failures)
    return res


def gateway_config(spool: Path, orthanc: Any, **over: Any) -> Any:
    from hygeia.serving.server import free_port
    from hygeia_pacs import GatewayConfig

    d = {"spool": str(spool), "port": free_port(), "allowed_callers": [SCU], "diagnoser": over.pop("diagnoser", "cnn"),
         "study_timeout_s": 0.5, "poll_s": 0.02, "modalities": ["DX", "CR"],
         "cstore": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}}
    d.update({k: v for k, v in over.items() if v is not None})
    return GatewayConfig.from_dict(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=200, help="studies for the throughput run (0: skip)")
    ap.add_argument("--per-study", type=int, default=1, help="images per study")
    ap.add_argument("--soak", type=int, default=1000, help="studies for the sustained-load run (0: skip)")
    ap.add_argument("--chunk", type=int, default=50, help="soak: studies per storescu run")
    ap.add_argument("--workers", type=int, help="gateway config (default: the gateway's)")
    ap.add_argument("--sr-processes", type=int, help="gateway config (default: the gateway's)")
    ap.add_argument("--batch-size", type=int, help="gateway config (default: the gateway's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (diagnoser and gateway alike)")
    ap.add_argument("--diagnoser", help="diagnoser plugin (default: the default diagnoser, what the gateway runs)")
    ap.add_argument("--triton", action="store_true",
                    help="the diagnoser served by a local tritonserver (`hygeia triton build`), called over gRPC "
                         "by the gateway and by the reference alike")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    import hygeia
    from hygeia_pacs import Gateway

    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from orthanc import Orthanc

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="hygeia-bench-gateway-"))
    from hygeia.plugins import get_registry

    name = args.diagnoser or get_registry().default_name("diagnoser")
    over = {"workers": args.workers, "sr_processes": args.sr_processes, "batch_size": args.batch_size, "diagnoser": name}
    out: dict[str, Any] = {"machine": f"{os.cpu_count()} CPU cores, torch threads {args.threads}", "config": {},
                           "diagnoser": name + (" on Triton" if args.triton else "")}
    with contextlib.ExitStack() as stack:
        if args.triton:
            cnn = stack.enter_context(triton_diagnoser(name, tmp, args.threads))
        else:
            cnn = hygeia.create("diagnoser", name)
        _measure(cnn, over, args, tmp, out, Orthanc, Gateway)
    report(out, args.json)
    return 0


@contextlib.contextmanager
def triton_diagnoser(name: str, tmp: Path, threads: int) -> Any:
    """``name`` built into a Triton repository and served by a local tritonserver: its RemoteDiagnoser."""
    from hygeia.serving import connect
    from hygeia.serving.repository import build_repository
    from hygeia.serving.server import TritonServer

    model = f"diagnoser_{name}"
    res = build_repository(tmp / "triton", names=[name])
    if model not in res.models:
        raise SystemExit(f"{model} cannot be built: {res.failed.get(model)}")
    with TritonServer(tmp / "triton", threads=threads, models=[model], startup_timeout=300) as srv:
        TRITON[:] = [srv]
        try:
            yield connect("diagnoser", name, srv.grpc_url, timeout=120)
        finally:
            TRITON.clear()


def _measure(cnn: Any, over: dict[str, Any], args: argparse.Namespace, tmp: Path, out: dict[str, Any],
             Orthanc: Any, Gateway: Any) -> None:
    orthanc = Orthanc(tmp / "orthanc").start()
    try:
        with Gateway(gateway_config(tmp / "spool", orthanc, **over), diagnoser=cnn) as gw:
            cfg = gw.config
            out["config"] = {k: getattr(cfg, k) for k in ("workers", "sr_processes", "batch_size", "study_timeout_s")}
            run_load(gw, orthanc, write_studies(tmp / "warm", 4, args.per_study, seed0=90))  # imports, first sends
            if args.studies:
                studies = write_studies(tmp / "tp", args.studies, args.per_study)
                sample = [f for s in studies[:32] for f in s]
                before = diagnoser_rate(cnn, sample)
                res = run_load(gw, orthanc, studies)
                after = diagnoser_rate(cnn, sample)  # before and after: the better one is the reference
                diag = {**max(before, after, key=lambda d: d["images_per_s"]),
                        "before_after": [round(before["images_per_s"], 1), round(after["images_per_s"], 1)]}
                gw_images = res.images / res.elapsed_s
                builds = [r["timings_s"].get("sr_s", 0.0) for r in map(json.loads, map(Path.read_text,
                          gw.spool.done.glob("*.json"))) if r.get("timings_s")]
                out["throughput"] = {**asdict(res), "studies_per_s": res.studies_per_s, "images_per_s": gw_images,
                                     "sr_build_ms": 1000 * float(np.median(builds)) if builds else 0.0,
                                     "diagnoser": diag, "ratio": gw_images / diag["images_per_s"], "target": 0.8}
            if args.soak:
                studies = write_studies(tmp / "soak", args.soak, args.per_study, seed0=20000)
                res = run_load(gw, orthanc, studies, chunk=args.chunk, warmup=min(100, args.soak // 5))
                out["soak"] = {**asdict(res), "studies_per_s": res.studies_per_s, "rss_growth": res.rss_growth}
    finally:
        orthanc.stop()


def report(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(out, indent=2))
        return
    print(f"machine: {out['machine']}; gateway {out['config']}")
    if "throughput" in out:
        t, d = out["throughput"], out["throughput"]["diagnoser"]
        print(f"gateway end to end: {t['sent']} studies ({t['images']} images) in {t['elapsed_s']:.1f} s "
              f"(storescu {t['storescu_s']:.1f} s): {t['studies_per_s']:.2f} studies/s, {t['images_per_s']:.2f} images/s")
        where = "over gRPC" if out["diagnoser"].endswith("on Triton") else "in-process"
        print(f"diagnoser {out['diagnoser']} alone, {where}: {d['images_per_s']:.1f} images/s at batch {d['best_batch']} "
              f"(per batch: {d['per_batch']}; best before/after the gateway run: {d['before_after']})")
        print(f"CPU per study (ms): {t['cpu_ms_per_study']} (SR build alone, median: {t['sr_build_ms']:.0f} ms)")
        print(f"  the gateway's threads still running at the end (ms per study): {t['gateway_threads_cpu_ms_per_study']}")
        ok = "ok" if t["ratio"] >= t["target"] else "MISSED"
        print(f"ratio gateway / diagnoser: {t['ratio']:.3f} (target >= {t['target']}) [{ok}]; "
              f"failures {t['failures']}, duplicates {t['duplicates']}, lost {t['lost']}")
    if "soak" in out:
        s = out["soak"]
        print(f"soak: sent {s['sent']}, acknowledged {s['acknowledged']}, delivered {s['delivered']}, "
              f"failures {s['failures']}, duplicates {s['duplicates']}, lost {s['lost']}; "
              f"{s['studies_per_s']:.2f} studies/s over {s['elapsed_s']:.0f} s")
        print(f"soak RSS (gateway + SR processes): {s['rss_warm_mb']:.0f} MiB after warm-up, {s['rss_end_mb']:.0f} MiB "
              f"at the end (growth {100 * s['rss_growth']:+.1f} %), max {s['rss_max_mb']:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
