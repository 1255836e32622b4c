"""Serving benchmark: a diagnoser four ways, side by side in one run.

    .venv/bin/python benchmarks/serving.py                       # the default diagnoser, ~3 minutes
    .venv/bin/python benchmarks/serving.py --diagnosers cxr fusion --duration 2 --json out.json
    .venv/bin/python benchmarks/serving.py --cold-start          # also: every built-in model, launch -> ready
    .venv/bin/python benchmarks/serving.py --perf-analyzer       # also: NVIDIA perf_analyzer against (c)

For each diagnoser (probabilities only, no heat maps: the harshest case for a server's fixed
per-request cost), with the same torch/ONNX Runtime threads everywhere (``--threads``, default 1,
also given to every Triton stub and to the PyTriton process):

- (a) ``eager``: in-process eager torch, the plugin's ``diagnose`` (what a user does without Hygeia);
- (b) ``pytriton``: the same eager plugin served by NVIDIA PyTriton (a child process; as many
  instances as Hygeia's model has), called with a raw tritonclient gRPC request;
- (c) ``hygeia``: Hygeia's Triton repository as `hygeia triton build` writes it (the runtime it
  measured and recorded, e.g. ONNX Runtime), called through ``RemoteDiagnoser``;
- (d) ``compiled``: what (c) runs, in-process: the frozen runner (:mod:`hygeia.frozen`) when the
  model is frozen, else the compiled network (:func:`hygeia.compiled.compile_plugin` with the
  runtime (c) recorded); the limit on this machine.

Printed: p50 and p99 at batch 1 and concurrency 1; throughput at c = 1, 2, 4, 8 with batch-1
requests; every figure also as a ratio to (a) (latency: to (a)'s p50; throughput: to (a)'s best
batch, the highest in-process throughput over batches 1, 8, 32 from one or two threads, measured
again alternating with (c) at c=8 for the throughput targets; the batch-1 rows count too). The
four ways are measured in alternating slices (a b c d a b c d ...) so load drift on a shared
machine biases none. Each slice runs its load for 0.3 s before its measurement window opens and
counts the work done inside the window (a call that straddles an edge by its share), as
perf_analyzer does: ramp-up and drain, which cost a pipelined server more than a loop in process,
bias no way. Targets (issue 22): (c) p50 <= 1.0 x (a) and <= (b); (c) at c=8 >= 1.0 x (a)'s best
batch and >= 0.9 x (d)'s best batch.

``--perf-analyzer`` also runs NVIDIA's perf_analyzer (its C++ gRPC client, no Python on the client
side) against (c)'s server at each concurrency, batch-1 requests of phantom pixels, no heat maps,
right after (a)-(d): infer/s with p50/p99 and Triton's own queue/compute split, next to (a)'s best
batch and (c)'s figure from ``RemoteDiagnoser``. `make venv` installs the binary (see
:func:`install_perf_analyzer`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from serving_peers import (PEER_SHM, PERF_ANALYZER_WHEEL, clinical_text, install_perf_analyzer, perf_analyzer_run,
                           raw_client, start_pytriton, stop_pytriton)

WAYS = ("eager", "pytriton", "hygeia", "compiled")


WARMUP_S = 0.3  # load runs this long before each measurement window opens (ramp excluded)


def _run(call: Callable[[int], Any], concurrency: int, duration: float,
         warmup: float = WARMUP_S) -> tuple[list[float], float, float]:
    """Run ``call(worker)`` from ``concurrency`` threads: ``warmup`` s of load, then a window of
    ``duration`` s, then each thread finishes its call. Returns (latencies of the calls that overlap
    the window, calls done inside the window, window length). A call that straddles an edge counts
    by the fraction of it inside the window, so ramp-up and drain bias no way (perf_analyzer, too,
    counts in a window while the load keeps running)."""
    spans: list[list[tuple[float, float]]] = [[] for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    edges: list[float] = []

    def worker(w: int) -> None:
        barrier.wait()
        stop = edges[1]
        while True:
            t = time.perf_counter()
            if t >= stop:
                break
            call(w)
            spans[w].append((t, time.perf_counter()))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    t0 = time.perf_counter() + warmup
    edges.extend((t0, t0 + duration))
    barrier.wait()
    for t in threads:
        t.join()
    lo, hi = edges
    lat, done = [], 0.0
    for a, b in (x for ws in spans for x in ws):
        inside = min(b, hi) - max(a, lo)
        if inside > 0:
            lat.append(b - a)
            done += inside / max(b - a, 1e-9)
    return lat, done, duration


def _stats(lat: list[float], done: float, window: float) -> dict[str, float]:
    s = sorted(lat)
    return {"p50_ms": 1e3 * statistics.median(s), "p99_ms": 1e3 * s[int(0.99 * (len(s) - 1))],
            "per_s": done / window, "calls": len(s)}


def _paired(calls: dict[str, tuple[Callable[[int], Any], int]], duration: float,
            rounds: int) -> dict[str, dict[str, float]]:
    """Each way ``name: (call, concurrency)`` in ``rounds`` alternating slices (A B C D A B C D ...):
    load drift on a shared machine biases none."""
    for call, concurrency in calls.values():
        for w in range(concurrency):
            call(w)
    acc: dict[str, tuple[list[float], float, float]] = {k: ([], 0.0, 0.0) for k in calls}
    for _ in range(rounds):
        for k, (call, concurrency) in calls.items():
            lat, done, window = _run(call, concurrency, duration / rounds)
            acc[k] = (acc[k][0] + lat, acc[k][1] + done, acc[k][2] + window)
    return {k: _stats(*v) for k, v in acc.items()}


def _best_batch(diagnose: Callable[[np.ndarray], Any], shape: tuple[int, ...], duration: float,
                sizes: tuple[int, ...] = (1, 8, 32)) -> dict[str, float]:
    """The highest in-process images/s over batch sizes, from one or two threads."""
    rng = np.random.default_rng(0)
    best = {"items_per_s": 0.0, "batch": 1, "threads": 1}
    for bs in sizes:
        x = rng.random((bs, *shape), dtype=np.float32)
        diagnose(x)
        for c in (1, 2):
            _lat, done, window = _run(lambda _w, x=x: diagnose(x), c, duration)
            ips = done * bs / window
            if ips > best["items_per_s"]:
                best = {"items_per_s": ips, "batch": bs, "threads": c}
    return best


def bench_diagnoser(name: str, args: argparse.Namespace, tmp: Path, console: Any) -> dict[str, Any]:
    import hygeia
    from hygeia.compiled import compile_plugin
    from hygeia.serving import connect
    from hygeia.serving.repository import build_repository
    from hygeia.serving.runtime import config_params
    from hygeia.serving.server import TritonServer

    t0 = time.perf_counter()
    res = build_repository(tmp / name, names=[name], instances=args.instances, queue_delay_us=args.queue_delay_us)
    model = f"diagnoser_{name}"
    if model not in res.models:
        raise RuntimeError(f"{model} cannot be built: {res.failed.get(model)}")
    params = config_params(tmp / name / model / "config.pbtxt")
    runtime = params["hygeia_runtime"]
    console.print(f"[bold]{name}[/]: built in {time.perf_counter() - t0:.1f} s; runtime {runtime} "
                  f"{params.get('hygeia_runtime_reason') or ''} (measured ms at batch 1, 32: {params['hygeia_runtime_ms']})",
                  highlight=False)
    eager = hygeia.create("diagnoser", name)
    if params.get("hygeia_frozen"):  # (c) serves the frozen runner: (d) is that runner in-process
        from hygeia.frozen import load

        fast = load(tmp / name / model / "1" / "frozen")
        runtime = f"{runtime}, frozen ({params['hygeia_frozen']})"
    else:
        fast = hygeia.create("diagnoser", name)
        compile_plugin(fast, runtime)
    h, w = eager.input_size
    shape = (1, h, w)
    img = np.random.default_rng(1).random((1, *shape), dtype=np.float32)
    line = clinical_text(h) if args.text else None
    text = (lambda n: None) if line is None else (lambda n: [line] * n)
    cfg = (tmp / name / model / "config.pbtxt").read_text()
    instances = int(cfg.split("count: ")[1].split()[0])
    max_batch = int(cfg.split("max_batch_size: ")[1].split()[0])
    from hygeia.serving.binary import shm_regions

    shm_before = shm_regions(prefixes=PEER_SHM)
    proc, url_b = start_pytriton(name, instances, max_batch, args.threads, tmp, text=line is not None)
    out: dict[str, Any] = {"runtime": runtime, "runtime_ms": json.loads(params["hygeia_runtime_ms"] or "{}"),
                           "runtime_reason": params.get("hygeia_runtime_reason", ""), "instances": instances}
    try:
        with TritonServer(tmp / name, threads=args.threads, startup_timeout=300) as srv:
            n = max(args.concurrency)
            remote = [connect("diagnoser", name, srv.grpc_url) for _ in range(n)]
            raw = [raw_client(url_b, line) for _ in range(n)]
            calls = {"eager": lambda _w: eager.diagnose(img, text(1), heatmaps=False),
                     "pytriton": lambda wk: raw[wk](img),
                     "hygeia": lambda wk: remote[wk].diagnose(img, text(1), heatmaps=False),
                     "compiled": lambda _w: fast.diagnose(img, text(1), heatmaps=False)}
            a = np.asarray([f.probability for f in eager.diagnose(img, heatmaps=False)[0].findings])
            c = np.asarray([f.probability for f in remote[0].diagnose(img, heatmaps=False)[0].findings])
            out["served_vs_eager_max_abs"] = float(np.abs(a - c).max())
            out["by_concurrency"] = {c: _paired({k: (f, c) for k, f in calls.items()}, args.duration, args.rounds)
                                     for c in args.concurrency}
            out["best"] = _baselines(out, {"eager": eager, "compiled": fast}, calls["hygeia"], shape, text, args)
            if args.perf_analyzer:
                out["perf_analyzer"] = perf_analyzer_run(srv.grpc_url, model, shape, args, tmp)
    finally:
        stop_pytriton(proc, shm_before)
    return out


def _baselines(out: dict[str, Any], plugins: dict[str, Any], hygeia_call: Callable[[int], Any],
               shape: tuple[int, ...], text: Callable[[int], Any], args: argparse.Namespace) -> dict[str, Any]:
    """(a)'s and (d)'s best batch: found on a grid, then measured again in slices alternating with
    (c) at the highest concurrency (``out["c_max_paired"]``); the batch-1 rows count too."""
    best = {k: _best_batch(lambda x, p=p: p.diagnose(x, text(len(x)), heatmaps=False), shape, args.grid)
            for k, p in plugins.items()}
    rng = np.random.default_rng(2)
    calls: dict[str, tuple[Callable[[int], Any], int]] = {}
    for k, b in best.items():
        x = rng.random((int(b["batch"]), *shape), dtype=np.float32)
        calls[k] = (lambda _w, p=plugins[k], x=x: p.diagnose(x, text(len(x)), heatmaps=False), int(b["threads"]))
    c_max = max(args.concurrency)
    calls["hygeia"] = (hygeia_call, c_max)
    paired = _paired(calls, args.duration, args.rounds)
    out["c_max_paired"] = paired["hygeia"]["per_s"]
    for k, b in best.items():
        b["items_per_s"] = paired[k]["per_s"] * b["batch"]
        for c, r in out["by_concurrency"].items():
            if r[k]["per_s"] > b["items_per_s"]:
                best[k] = {"items_per_s": r[k]["per_s"], "batch": 1, "threads": c}
    return best


def report(name: str, r: dict[str, Any], console: Any) -> dict[str, Any]:
    from rich.table import Table

    conc = sorted(r["by_concurrency"])
    c1 = r["by_concurrency"][1] if 1 in r["by_concurrency"] else r["by_concurrency"][conc[0]]
    base_lat, base = c1["eager"]["p50_ms"], r["best"]["eager"]["items_per_s"]
    b, d = r["best"]["eager"], r["best"]["compiled"]
    t = Table("way", "p50 ms", "p99 ms", "p50 / (a)", *(f"c={c} img/s (/ (a) best)" for c in conc),
              title=f"{name}: batch-1 requests; (a) best batch {base:.0f} img/s (batch {b['batch']}, "
                    f"{b['threads']} thread(s)); (d) best {d['items_per_s']:.0f} img/s (batch {d['batch']}, "
                    f"{d['threads']} thread(s)); served runtime: {r['runtime']}")
    for i, way in enumerate(WAYS):
        if way not in c1:
            continue
        s = c1[way]
        t.add_row(f"({'abcd'[i]}) {way}", f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}", f"{s['p50_ms'] / base_lat:.2f}",
                  *(f"{r['by_concurrency'][c][way]['per_s']:.0f} ({r['by_concurrency'][c][way]['per_s'] / base:.2f})"
                    for c in conc))
    console.print(t)
    c8 = r["c_max_paired"]  # measured alternating with (a)'s and (d)'s best batch
    p50 = c1["hygeia"]["p50_ms"]
    checks = {"hygeia p50 / eager p50 <= 1.0": p50 / base_lat,
              f"hygeia c={max(conc)} / eager best batch >= 1.0": c8 / base,
              f"hygeia c={max(conc)} / compiled best batch >= 0.9": c8 / d["items_per_s"]}
    if "pytriton" in c1:
        checks["hygeia p50 / pytriton p50 <= 1.0"] = p50 / c1["pytriton"]["p50_ms"]
    for k, v in checks.items():
        bound = float(k.split()[-1])
        ok = v <= bound if "<=" in k else v >= bound
        console.print(f"  {k}: {v:.2f} {'met' if ok else '[red]not met[/]'}")
    console.print(f"  (c) at c={max(conc)}, alternating with (a)'s and (d)'s best batch: {c8:.0f} img/s; "
                  f"(a) best {base:.0f}, (d) best {d['items_per_s']:.0f}")
    console.print(f"  served vs eager probabilities: max abs diff {r['served_vs_eager_max_abs']:.1e}")
    if "perf_analyzer" in r:
        _report_perf(r, c1["eager"]["p50_ms"], base, d["items_per_s"], console)
    return checks


def _report_perf(r: dict[str, Any], eager_p50: float, base: float, best_d: float, console: Any) -> None:
    from rich.table import Table

    pa = r["perf_analyzer"]
    t = Table("c", "infer/s", "/ (a) best", "/ (d) best", "/ (c) client", "p50 ms", "p99 ms", "p50 / (a) p50", "server queue ms",
              "server compute ms", title=f"perf_analyzer (gRPC, batch 1, {pa['input']}, heat maps off) against (c); "
                                        f"(a) best batch {base:.0f} img/s, (d) best batch {best_d:.0f} img/s, "
                                        f"(a) p50 {eager_p50:.2f} ms")
    for c, s in pa["levels"].items():
        if "error" in s:
            t.add_row(str(c), f"[red]{s['error']}[/]")
            continue
        own = r["by_concurrency"].get(c, {}).get("hygeia", {}).get("per_s")
        t.add_row(str(c) + (" (unstable)" if s["unstable"] else ""), f"{s['per_s']:.0f}", f"{s['per_s'] / base:.2f}",
                  f"{s['per_s'] / best_d:.2f}",
                  f"{s['per_s'] / own:.2f}" if own else "-", f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}",
                  f"{s['p50_ms'] / eager_p50:.2f}", f"{s['server_queue_ms']:.2f}", f"{s['server_compute_ms']:.2f}")
    console.print(t)


def cold_start(tmp: Path, threads: int, console: Any) -> dict[str, Any]:
    """Every built-in model (the plugins the ``hygeia`` package registers; third-party ones
    installed beside it are left out): launch -> ready (Triton's readiness) and -> every plugin built."""
    from hygeia.plugins import get_registry
    from hygeia.serving.repository import build_repository
    from hygeia.serving.server import TritonServer

    full = build_repository(tmp / "full", names=[s.name for s in get_registry().all() if s.package == "hygeia"])
    with TritonServer(tmp / "full", threads=threads, startup_timeout=300, allow_failures=True) as srv:
        out = {"models": full.models, "left_out": full.failed, "ready_s": srv.ready_after,
               "built_s": srv.warm_after, "build_s": dict(srv.warm_times), "failed": dict(srv.failed)}
    console.print(f"cold start: {len(full.models)} built-in models ready after {out['ready_s']:.1f} s, every one "
                  f"built after {out['built_s']:.1f} s (target: <= 10 s); slowest: " + ", ".join(
                      f"{k} {v:.1f} s" for k, v in sorted(out["build_s"].items(), key=lambda kv: -kv[1])[:3]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diagnosers", nargs="+", default=None, help="default: the default diagnoser")
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per way and concurrency")
    ap.add_argument("--rounds", type=int, default=4, help="alternating slices per figure")
    ap.add_argument("--grid", type=float, default=1.0, help="seconds per batch size of the best-batch search")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads, in-process and per stub")
    ap.add_argument("--instances", type=int, default=None, help="Triton instances (default: as `hygeia triton build`)")
    ap.add_argument("--queue-delay-us", type=int, default=0, help="Triton dynamic batching delay (as `triton build`)")
    ap.add_argument("--text", action="store_true", help="send a clinical text line with every image (fusion)")
    ap.add_argument("--cold-start", action="store_true")
    ap.add_argument("--perf-analyzer", action="store_true", help="also run NVIDIA perf_analyzer against (c)")
    ap.add_argument("--pa-interval", type=float, default=2.0, help="perf_analyzer measurement window, seconds")
    ap.add_argument("--pa-trials", type=int, default=5, help="perf_analyzer windows at most per concurrency")
    ap.add_argument("--pa-stability", type=float, default=25.0,
                    help="perf_analyzer: percent spread of the last 3 windows that counts as stable")
    ap.add_argument("--install-perf-analyzer", action="store_true",
                    help=f"copy perf_analyzer from the {PERF_ANALYZER_WHEEL} wheel into this venv's bin, and exit")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.install_perf_analyzer:
        print(install_perf_analyzer())
        return 0

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    import hygeia
    from rich.console import Console

    console = Console(width=150)
    names = args.diagnosers or [hygeia.get_registry().default_name("diagnoser")]
    tmp = Path(tempfile.mkdtemp(prefix="hygeia-bench-"))
    out: dict[str, Any] = {"threads": args.threads, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
                           "duration_s": args.duration, "diagnosers": {}}
    for name in names:
        r = bench_diagnoser(name, args, tmp, console)
        r["checks"] = report(name, r, console)
        out["diagnosers"][name] = r
    if args.cold_start:
        out["cold_start"] = cold_start(tmp, args.threads, console)
    out["loadavg_end"] = os.getloadavg()
    console.print(f"load average start {out['loadavg_start']}, end {out['loadavg_end']} on {os.cpu_count()} CPUs "
                  "(shared machines inflate every figure)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
