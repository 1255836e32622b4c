"""Serving overhead: every model in-process vs through Triton gRPC, side by side in one run.

    .venv/bin/python benchmarks/serving.py                 # cnn + every buildable generator
    .venv/bin/python benchmarks/serving.py --duration 2 --json out.json

Measured in one process, on the same machine, with the same number of torch threads on both sides
(``--threads``, default 1, exported as OMP_NUM_THREADS to the Triton stubs too):

- cold start: tritonserver launch -> every model of the full built-in repository ready (Triton's
  readiness; from the server log, also per model), and -> every plugin built (the adapter builds
  plugins in a background thread after readiness; a model's first request waits for its build);
- for the cnn diagnoser (batch-1 requests, probabilities only: no heat maps, the harshest case
  for the fixed per-request cost of gRPC + the Python backend) and each generator (n=1 per request):
  p50/p95 latency and throughput at concurrency 1, 4, 8, in-process (threads sharing one plugin
  object) and through Triton (one gRPC client per thread, dynamic batching on the server);
- the best in-process throughput: every batch size (diagnoser: 1, 8, 32, 64 images; generator:
  n = 1, 8, 32) at concurrency 1 and 2 (two threads use the second core, as two Triton instances
  do), and the concurrency rows above; the highest of all is the baseline of the ratios;
- through Triton at concurrency 8 with requests of the in-process best batch size (a batching
  client, like perf_analyzer -b; for a generator, n images per request);
- the diagnoser's default call (Grad-CAM heat maps and regions, what `hygeia diagnose`, the
  gateway and the SR use) at batch 1, c=1, both ways.

The repository is built as `hygeia triton build` builds it (``--instances`` overrides: by default
two stubs per diagnoser and generator on a CPU host with 2+ cores).

Ratios printed at the end, against the targets of the serving issue:
  Triton/in-process p50 at batch 1 <= 1.10 (diagnoser);
  Triton throughput at concurrency 8 >= 0.9 x in-process throughput at the best batch size;
  every built-in model ready <= 10 s after launch.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _run(call: Callable[[int], Any], concurrency: int, duration: float) -> tuple[list[float], float]:
    """Run ``call(worker)`` from ``concurrency`` threads for ``duration`` s: (latencies, wall time)."""
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    stop = time.monotonic() + duration
    barrier = threading.Barrier(concurrency + 1)

    def worker(w: int) -> None:
        barrier.wait()
        while time.monotonic() < stop:
            t = time.perf_counter()
            call(w)
            lat[w].append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    return [x for ws in lat for x in ws], time.perf_counter() - t0


def _stats(lat: list[float], wall: float) -> dict[str, float]:
    s = sorted(lat)
    return {"p50_ms": 1e3 * statistics.median(s), "p95_ms": 1e3 * s[int(0.95 * (len(s) - 1))],
            "per_s": len(s) / wall, "calls": len(s)}


def _measure(call: Callable[[int], Any], concurrency: int, duration: float, warmup: int = 3) -> dict[str, float]:
    for w in range(concurrency):
        for _ in range(warmup if w == 0 else 1):
            call(w)
    return _stats(*_run(call, concurrency, duration))


def _paired(calls: dict[str, Callable[[int], Any]], concurrency: int, duration: float, rounds: int,
            warmup: int = 2) -> dict[str, dict[str, float]]:
    """Measure several ways of doing the same work in alternating slices (A B A B ...), so that
    a machine whose load drifts (shared CI runners) biases none of them."""
    for call in calls.values():
        for w in range(concurrency):
            for _ in range(warmup if w == 0 else 1):
                call(w)
    acc: dict[str, tuple[list[float], float]] = {k: ([], 0.0) for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            lat, wall = _run(call, concurrency, duration / rounds)
            acc[k] = (acc[k][0] + lat, acc[k][1] + wall)
    return {k: _stats(*v) for k, v in acc.items()}


def _grid(rows: list[dict[str, Any]], model: str, sizes: tuple[int, ...], duration: float,
          make: Callable[[int], Callable[[int], Any]]) -> tuple[float, int]:
    """In-process throughput of ``model`` at each batch size, from 1 and 2 threads; rows appended.
    Returns (best items/s, its batch size)."""
    best = (0.0, 1)
    for bs in sizes:
        call = make(bs)
        for c in (1, 2):
            r = _measure(call, c, duration, warmup=1)
            ips = r["per_s"] * bs
            rows.append({"model": model, "mode": "in-process", "concurrency": c, "batch": bs, **r,
                         "items_per_s": ips, "grid": True})
            if ips > best[0]:
                best = (ips, bs)
    return best


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ready_times(log: str, launched: datetime) -> dict[str, float]:
    """Seconds from launch to 'successfully loaded <model>' for each model, from the server log."""
    out: dict[str, float] = {}
    for m in re.finditer(r"I(\d{4}) (\d\d:\d\d:\d\d\.\d+) \d+ model_lifecycle\.cc:\d+\] \"successfully loaded '([^']+)'", log):
        ts = datetime.strptime(f"{launched.year}{m.group(1)} {m.group(2)}", "%Y%m%d %H:%M:%S.%f")
        out[m.group(3)] = (ts - launched.replace(tzinfo=None)).total_seconds()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--instances", type=int, default=None,
                    help="Triton instances per model (stubs); default: what `hygeia triton build` writes")
    ap.add_argument("--rounds", type=int, default=4, help="alternating in-process/Triton slices per figure")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, in-process and per Triton stub")
    ap.add_argument("--diagnoser", default="cnn")
    ap.add_argument("--generators", nargs="*", default=None, help="default: every generator that builds")
    ap.add_argument("--skip-cold-start", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    import hygeia
    from hygeia.serving import connect
    from hygeia.serving.repository import build_repository
    from hygeia.serving.server import TritonServer

    from rich.console import Console
    from rich.table import Table

    console = Console()
    report: dict[str, Any] = {"threads": args.threads, "instances": args.instances, "duration_s": args.duration, "cpus": os.cpu_count(),
                              "loadavg_start": os.getloadavg()}
    tmp = Path(tempfile.mkdtemp(prefix="hygeia-bench-"))

    # ---------------------------------------------------------------- cold start, full repository
    if not args.skip_cold_start:
        full = build_repository(tmp / "full")
        console.print(f"full repository: {len(full.models)} models; left out: {sorted(full.failed) or 'none'}")
        launched = datetime.now()
        with TritonServer(tmp / "full", threads=args.threads, startup_timeout=300, allow_failures=True) as srv:
            ready_all = srv.ready_after
            warm_all, warm_times = srv.warm_after, dict(srv.warm_times)
            per_model = _ready_times(srv.log_path.read_text(errors="replace"), launched)
            cpu = {m: _cpu_seconds(pid) for m, pid in srv.stub_pids().items()}
        report["cold_start"] = {"all_ready_s": ready_all, "per_model_s": per_model, "models": full.models,
                                "left_out": full.failed, "stub_cpu_s": cpu, "all_built_s": warm_all,
                                "build_s": warm_times}
        console.print(f"cold start: all {len(full.models)} models ready after {ready_all:.1f} s; CPU time "
                      f"spent loading, per stub: " + ", ".join(f"{m} {v:.1f}" for m, v in sorted(cpu.items()))
                      + f" (total {sum(cpu.values()):.1f} s on {os.cpu_count()} CPUs)")

    # ---------------------------------------------------------------- steady state
    gens = args.generators
    if gens is None:
        gens = [s.name for s in hygeia.get_registry().all("generator")]
    names = [args.diagnoser, *gens]
    res = build_repository(tmp / "bench", names=names, instances=args.instances)
    gens = [g for g in gens if f"generator_{g}" in res.models]
    skipped = {m: e for m, e in res.failed.items()}
    if skipped:
        console.print(f"[yellow]left out (cannot be built here):[/] {', '.join(sorted(skipped))}")
    report["left_out"] = skipped
    rows: list[dict[str, Any]] = []
    report["best_batch"] = {}

    with TritonServer(tmp / "bench", threads=args.threads, startup_timeout=300, allow_failures=True) as srv:
        report["bench_repo_ready_s"] = srv.ready_after
        if srv.failed:  # e.g. weights retrained between build and load (stale identity)
            console.print(f"[yellow]failed to load, left out:[/] {srv.failed}")
            report["left_out"].update(srv.failed)
            gens = [g for g in gens if f"generator_{g}" not in srv.failed]
        # diagnoser
        if f"diagnoser_{args.diagnoser}" in res.models and f"diagnoser_{args.diagnoser}" not in srv.failed:
            local = hygeia.create("diagnoser", args.diagnoser)
            h, w = local.input_size
            rng = np.random.default_rng(0)
            img = rng.random((1, 1, h, w), dtype=np.float32)
            remote = [connect("diagnoser", args.diagnoser, srv.grpc_url) for _ in range(max(args.concurrency))]
            best = _grid(rows, f"diagnoser {args.diagnoser}", (1, 8, 32, 64), args.duration,
                         lambda bs: (lambda _w, b=rng.random((bs, 1, h, w), dtype=np.float32):
                                     local.diagnose(b, heatmaps=False)))
            # where the time of one batch-1 request goes on the server (Triton's own statistics)
            c0 = remote[0].conn.client()
            before = c0.get_inference_statistics(f"diagnoser_{args.diagnoser}", as_json=True)["model_stats"][0]
            r1 = _measure(lambda _w: remote[0].diagnose(img, heatmaps=False), 1, args.duration)
            after = c0.get_inference_statistics(f"diagnoser_{args.diagnoser}", as_json=True)["model_stats"][0]
            def ns(st: dict[str, Any], k: str) -> int:  # JSON leaves out zero fields
                return int(st.get("inference_stats", {}).get(k, {}).get("ns", 0))

            n = int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))
            server = {k: (ns(after, k) - ns(before, k)) / max(n, 1) / 1e6
                      for k in ("queue", "compute_input", "compute_infer", "compute_output", "success")}
            report["diagnoser_server_ms"] = {**server, "client_p50_ms": r1["p50_ms"], "requests": n}
            console.print(f"diagnoser batch 1, one client: client p50 {r1['p50_ms']:.2f} ms; on the server (means): "
                          f"queue {server['queue']:.2f}, input {server['compute_input']:.2f}, model "
                          f"{server['compute_infer']:.2f}, output {server['compute_output']:.2f}, request total "
                          f"{server['success']:.2f} ms")
            for c in args.concurrency:
                pair = _paired({"in-process": lambda _w: local.diagnose(img, heatmaps=False),
                                "triton": lambda wk: remote[wk].diagnose(img, heatmaps=False)},
                               c, args.duration, args.rounds)
                for mode, r in pair.items():
                    rows.append({"model": f"diagnoser {args.diagnoser}", "mode": mode, "concurrency": c,
                                 "batch": 1, **r, "items_per_s": r["per_s"]})
            # throughput with requests of the in-process best batch size (what a batching client sends,
            # like perf_analyzer -b): the fixed per-request cost is shared by the batch
            bb = best[1]
            if bb > 1:
                big = rng.random((bb, 1, h, w), dtype=np.float32)
                c8 = max(args.concurrency)
                r = _measure(lambda wk: remote[wk].diagnose(big, heatmaps=False), c8, args.duration)
                rows.append({"model": f"diagnoser {args.diagnoser}", "mode": "triton", "concurrency": c8,
                             "batch": bb, **r, "items_per_s": r["per_s"] * bb})
            report["best_batch"][f"diagnoser {args.diagnoser}"] = bb
            # the call `hygeia diagnose`, the gateway and the SR make: heat maps and regions included
            pair = _paired({"in-process": lambda _w: local.diagnose(img),
                            "triton": lambda wk: remote[wk].diagnose(img)}, 1, args.duration, args.rounds)
            for mode, r in pair.items():
                rows.append({"model": f"diagnoser {args.diagnoser} +heat maps", "mode": mode, "concurrency": 1,
                             "batch": 1, **r, "items_per_s": r["per_s"]})
        # generators
        for g in gens:
            local = hygeia.create("generator", g)
            remote = [connect("generator", g, srv.grpc_url) for _ in range(max(args.concurrency))]
            cond = next((c for k, c in (("none", None), ("label", "effusion"), ("properties", {"logP": 2.0}),
                                        ("text", "left pleural effusion")) if k in local.condition_kinds), None)
            seeds = iter(range(10**9))
            for c in args.concurrency:
                pair = _paired({"in-process": lambda _w: local.generate(1, condition=cond, seed=next(seeds)),
                                "triton": lambda wk: remote[wk].generate(1, condition=cond, seed=next(seeds))},
                               c, args.duration, args.rounds, warmup=1)
                for mode, r in pair.items():
                    rows.append({"model": f"generator {g}", "mode": mode, "concurrency": c, "batch": 1, **r,
                                 "items_per_s": r["per_s"]})
            t0 = time.perf_counter()
            local.generate(1, condition=cond, seed=0)
            sizes = (1, 8, 32) if time.perf_counter() - t0 < 0.1 else (1, 8)  # slow samplers: fewer sizes
            best = _grid(rows, f"generator {g}", sizes, args.duration,
                         lambda n: (lambda _w: local.generate(n, condition=cond, seed=next(seeds))))
            if best[1] > 1:
                c8, n = max(args.concurrency), best[1]
                r = _measure(lambda wk: remote[wk].generate(n, condition=cond, seed=next(seeds)), c8, args.duration,
                             warmup=1)
                rows.append({"model": f"generator {g}", "mode": "triton", "concurrency": c8, "batch": n, **r,
                             "items_per_s": r["per_s"] * n})
            report["best_batch"][f"generator {g}"] = best[1]
    report["rows"] = rows
    report["loadavg_end"] = os.getloadavg()

    t = Table("model", "mode", "conc.", "batch", "p50 ms", "p95 ms", "items/s", title="in-process vs Triton gRPC")
    for r in rows:
        t.add_row(r["model"], r["mode"] + (" (grid)" if r.get("grid") else ""), str(r["concurrency"]), str(r["batch"]), f"{r['p50_ms']:.2f}",
                  f"{r['p95_ms']:.2f}", f"{r['items_per_s']:.1f}")
    console.print(t)

    # ---------------------------------------------------------------- ratios
    def row(model: str, mode: str, c: int, batch: int = 1) -> dict[str, Any] | None:
        return next((r for r in rows if r["model"] == model and r["mode"] == mode and r["concurrency"] == c
                     and r["batch"] == batch and not r.get("grid")), None)

    ratios = Table("figure", "value", "target", "met", title="ratios (Triton / in-process)")
    checks: dict[str, Any] = {}
    models = sorted({r["model"] for r in rows})
    for m in models:
        c1_t, c1_l = row(m, "triton", 1), row(m, "in-process", 1)
        if c1_t and c1_l:
            v = c1_t["p50_ms"] / c1_l["p50_ms"]
            target = 1.10 if m.startswith("diagnoser") else None
            checks[f"{m}: p50 ratio c=1"] = v
            ratios.add_row(f"{m}: p50 at batch 1, c=1", f"{v:.2f}", "<= 1.10" if target else "-",
                           ("yes" if v <= target else "[red]no[/]") if target else "-")
        c8 = max(args.concurrency)
        base_row = max((r for r in rows if r["model"] == m and r["mode"] == "in-process"),
                       key=lambda r: r["items_per_s"], default=None)
        if base_row is None or m not in report["best_batch"]:  # the heat-map rows: latency only
            continue
        base = base_row["items_per_s"]
        what = f"in-process best (batch {base_row['batch']}, c={base_row['concurrency']})"
        for batch in sorted({1, report["best_batch"][m]}):
            t8 = row(m, "triton", c8, batch)
            if not t8:
                continue
            v = t8["items_per_s"] / base
            key = f"{m}: throughput ratio c={c8}" + (f", requests of {batch}" if batch > 1 else "")
            checks[key] = v
            ratios.add_row(f"{m}: throughput c={c8}, requests of {batch} / {what}", f"{v:.2f}", ">= 0.90",
                           "yes" if v >= 0.9 else "[red]no[/]")
    if "cold_start" in report:
        v = report["cold_start"]["all_ready_s"]
        checks["cold start s"] = v
        ratios.add_row(f"cold start: {len(report['cold_start']['models'])} models ready (s)", f"{v:.1f}", "<= 10",
                       "yes" if v <= 10 else "[red]no[/]")
        slow = sorted(report["cold_start"]["per_model_s"].items(), key=lambda kv: -kv[1])
        console.print("per-model ready (s after launch): " + ", ".join(f"{k} {v:.1f}" for k, v in slow))
        w = report["cold_start"]["all_built_s"]
        if w is not None:
            checks["all plugins built s"] = w
            ratios.add_row("  every plugin built (first requests wait for it)", f"{w:.1f}", "-", "-")
            slow_b = sorted(report["cold_start"]["build_s"].items(), key=lambda kv: -kv[1])
            console.print("per-model plugin build (s, background, low priority): "
                          + ", ".join(f"{k} {v:.1f}" for k, v in slow_b))
    console.print(ratios)
    console.print(f"load average start {report['loadavg_start']}, end {report['loadavg_end']} "
                  f"on {os.cpu_count()} CPUs (shared machines inflate every figure)")
    report["ratios"] = checks
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
