"""The peers of ``benchmarks/serving.py``: (b) NVIDIA PyTriton serving the eager plugin (this file
runs as its child process: ``--pytriton-child``), a raw tritonclient for it, and NVIDIA's
perf_analyzer against Hygeia's server (installed by ``serving.py --install-perf-analyzer``)."""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


# ---------------------------------------------------------------- (b): PyTriton, in a child process
def pytriton_child(name: str, instances: int, max_batch: int, text: bool, port_file: Path) -> None:
    """Serve ``name``'s eager plugin with PyTriton (``text``: with a TEXTS input, one line per image);
    write the gRPC port to ``port_file`` when ready (not to stdout, where PyTriton's log thread
    writes too); serve until stdin closes."""
    import hygeia
    from hygeia.serving.binary import free_port
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    _patch_pytriton_proxy()
    plugin = hygeia.create("diagnoser", name)

    @batch
    def infer(IMAGES: np.ndarray) -> dict[str, np.ndarray]:
        ds = plugin.diagnose(IMAGES, heatmaps=False)
        return {"PROBS": np.array([[f.probability for f in d.findings] for d in ds], np.float32)}

    @batch
    def infer_text(IMAGES: np.ndarray, TEXTS: np.ndarray) -> dict[str, np.ndarray]:
        texts = [t[0].decode() if isinstance(t[0], bytes) else str(t[0]) for t in TEXTS]
        ds = plugin.diagnose(IMAGES, texts, heatmaps=False)
        return {"PROBS": np.array([[f.probability for f in d.findings] for d in ds], np.float32)}

    inputs = [Tensor(name="IMAGES", dtype=np.float32, shape=(-1, -1, -1))]
    if text:
        inputs.append(Tensor(name="TEXTS", dtype=bytes, shape=(1,)))

    grpc = free_port()
    cfg = TritonConfig(grpc_port=grpc, http_port=free_port(), metrics_port=free_port(), exit_timeout_secs=3,
                       log_verbose=0)
    with Triton(config=cfg) as triton:
        triton.bind("diagnoser", [infer_text if text else infer] * instances, inputs=inputs,
                    outputs=[Tensor(name="PROBS", dtype=np.float32, shape=(-1,))],
                    config=ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=0)))
        triton.run()
        part = port_file.with_suffix(".part")
        part.write_text(str(grpc))
        part.replace(port_file)
        sys.stdin.read()


# The wheel's Python-backend stub embeds an older CPython 3.11 whose C RLock lacks _recursion_count,
# which this Python's multiprocessing (used by PyTriton's proxy model in the stub) calls: the proxy
# files PyTriton sends to the server get a Python RLock for the resource tracker appended.
_STUB_FIX = b"""

import threading as _hyg_t, multiprocessing.resource_tracker as _hyg_rt
if not hasattr(_hyg_rt._resource_tracker._lock, "_recursion_count"):
    _hyg_rt._resource_tracker._lock = _hyg_t._PyRLock()
"""


def _patch_pytriton_proxy() -> None:
    from pytriton.models.model import Model

    files = Model.get_proxy_model_files

    def patched(self: Any) -> dict[str, bytes]:
        return {k: v + _STUB_FIX if k.endswith("/data.py") else v for k, v in files(self).items()}
    Model.get_proxy_model_files = patched  # type: ignore[method-assign]


def start_pytriton(name: str, instances: int, max_batch: int, threads: int, tmp: Path,
                    text: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """Start :func:`pytriton_child` (its log in ``tmp``); wait for its port file. A start that
    fails is tried once more (PyTriton's proxy model sometimes misses its own handshake socket:
    "get_config_from_handshake_server ... Connection refused")."""
    try:
        return _start_pytriton_once(name, instances, max_batch, threads, tmp, text)
    except RuntimeError as exc:
        print(f"PyTriton did not start ({str(exc)[:160]}); trying once more", file=sys.stderr)
        return _start_pytriton_once(name, instances, max_batch, threads, tmp, text)


def _start_pytriton_once(name: str, instances: int, max_batch: int, threads: int, tmp: Path,
                         text: bool) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    port_file, log = tmp / f"pytriton-{name}.port", tmp / f"pytriton-{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--pytriton-child", name, str(instances), str(max_batch),
                                 "1" if text else "0", str(port_file)],
                                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own process group: stop_pytriton ends every stub
    deadline = time.monotonic() + 300
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"the PyTriton server was not ready (exit code {proc.wait()}); {log}: {' | '.join(tail)}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port_file.read_text()}"


PEER_SHM = ("pytrtion", "triton_python_backend_shm_region_")
"""Shared-memory region names of PyTriton's server (its own prefix) and of the Python backend."""


def stop_pytriton(proc: subprocess.Popen[bytes], shm_before: set[str]) -> None:
    """Ask the PyTriton child to stop (stdin closed), then end what is left of its process group
    (PyTriton's Python-backend stubs could outlive it as orphans) and remove the shared-memory
    regions it left (``shm_before``: the regions there before it started)."""
    import signal

    from hygeia.serving.binary import remove_stale_regions

    proc.stdin.close()  # type: ignore[union-attr]
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    remove_stale_regions(shm_before, pgid=proc.pid, prefixes=PEER_SHM)


def raw_client(url: str, text: str | None = None) -> Callable[[np.ndarray], Any]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    out = [grpcclient.InferRequestedOutput("PROBS")]

    def call(x: np.ndarray) -> np.ndarray:
        inp = grpcclient.InferInput("IMAGES", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        inputs = [inp]
        if text is not None:
            t = grpcclient.InferInput("TEXTS", [len(x), 1], "BYTES")
            t.set_data_from_numpy(np.array([[text.encode()]] * len(x), dtype=object))
            inputs.append(t)
        return client.infer("diagnoser", inputs, outputs=out).as_numpy("PROBS")
    return call


def clinical_text(size: int) -> str:
    """A phantom's clinical text line (what perf_analyzer sends too), or a fixed one without the lab."""
    try:
        from hygeia_lab import make_phantom

        return str(make_phantom(seed=0, size=size).text)
    except ImportError:
        return "72 y/o male. productive cough and fever for 3 days; T 38.4; CRP 140; SOB on exertion."


# ---------------------------------------------------------------- NVIDIA perf_analyzer against (c)
# The perf-analyzer wheel (2.60) needs glibc 2.38 and GLIBCXX_3.4.32; Debian 12 has glibc 2.36.
# tritonclient 2.51.0 (the release of the embedded tritonserver) ships a perf_analyzer that runs
# here; it links libb64.so.0d (Debian: libb64-0d) and libcudart.so.12 (PyPI: nvidia-cuda-runtime-cu12,
# the `bench` extra; no GPU needed unless --shared-memory cuda).
PERF_ANALYZER_WHEEL = "tritonclient==2.51.0"


def install_perf_analyzer(dest: Path | None = None) -> Path:
    """Copy perf_analyzer out of the tritonclient 2.51.0 wheel into the venv's bin (not installing that
    older tritonclient itself)."""
    import tempfile
    import zipfile

    dest = dest or Path(sys.prefix) / "bin" / "perf_analyzer"
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                        "--only-binary=:all:", "-d", d, PERF_ANALYZER_WHEEL], check=True)
        whl = next(Path(d).glob("tritonclient-*.whl"))
        with zipfile.ZipFile(whl) as z:
            member = next(n for n in z.namelist() if n.endswith(".data/data/bin/perf_analyzer"))
            tmp = dest.with_suffix(".part")
            tmp.write_bytes(z.read(member))
    tmp.chmod(0o755)
    tmp.replace(dest)
    return dest


def _perf_analyzer() -> tuple[str, dict[str, str]]:
    """The perf_analyzer binary and an environment that finds libcudart.so.12; raises if it cannot run."""
    exe = Path(sys.prefix) / "bin" / "perf_analyzer"
    path = str(exe) if exe.exists() else shutil.which("perf_analyzer")
    if path is None:
        raise RuntimeError("perf_analyzer not found: `make venv`, or .venv/bin/python benchmarks/serving.py "
                           "--install-perf-analyzer")
    libs = [str(p / "nvidia" / "cuda_runtime" / "lib") for p in map(Path, sys.path)
            if (p / "nvidia" / "cuda_runtime" / "lib").is_dir()]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(libs + [os.environ.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)}
    v = subprocess.run([path, "--version"], capture_output=True, text=True, env=env, check=False)
    if "Perf Analyzer Version" not in v.stdout + v.stderr:
        raise RuntimeError(f"{path} does not run ({(v.stdout + v.stderr).strip()}); it needs libb64.so.0d "
                           "(apt-get install libb64-0d) and libcudart.so.12 (pip install nvidia-cuda-runtime-cu12)")
    return path, env


def _perf_input(path: Path, shape: tuple[int, ...], n: int = 4, text: bool = False) -> str:
    """perf_analyzer's --input-data JSON: ``n`` phantom radiographs (random pixels without hygeia_lab),
    with ``text``: each with its clinical text line (TEXTS)."""
    texts = [f"cough and fever for {k + 2} days, CRP {40 * (k + 1)}" for k in range(n)]
    try:
        from hygeia_lab import make_phantom

        ps = [make_phantom(seed=s, size=shape[-1]) for s in range(n)]
        images, texts = [p.image for p in ps], [p.text for p in ps]
        kind = "phantoms"
    except ImportError:
        images = list(np.random.default_rng(3).random((n, *shape[-2:]), dtype=np.float32))
        kind = "random pixels"
    data = [{"IMAGES": {"content": np.round(np.asarray(im, np.float32), 6).ravel().tolist(), "shape": list(shape)},
             **({"TEXTS": {"content": [t], "shape": [1]}} if text else {})}
            for im, t in zip(images, texts)]
    kind += " with their text" if text else ""
    path.write_text(json.dumps({"data": data}))
    return f"{n} {kind}"


def perf_analyzer_run(url: str, model: str, shape: tuple[int, ...], args: argparse.Namespace,
                      tmp: Path) -> dict[str, Any]:
    """perf_analyzer at each of ``args.concurrency`` (one invocation each): infer/s, latency percentiles
    (client side, ms) and Triton's own per-request split (server side, ms) from its CSV."""
    exe, env = _perf_analyzer()
    data = tmp / f"{model}-perf-input.json"
    source = _perf_input(data, shape, text=bool(getattr(args, "text", False)))
    # Heat maps off, as for (a)-(d): perf_analyzer asks for every output, so say it with a parameter.
    base = [exe, "-m", model, "-u", url, "-i", "grpc", "-b", "1", "--input-data", str(data),
            "--measurement-interval", str(int(args.pa_interval * 1000)), "--max-trials", str(args.pa_trials),
            "--stability-percentage", str(args.pa_stability), "--request-parameter", "heatmaps:false:bool"]
    out: dict[str, Any] = {"command": " ".join(map(str, base)), "input": source, "levels": {}}
    for c in args.concurrency:
        report_csv = tmp / f"{model}-perf-c{c}.csv"
        cmd = base + ["--concurrency-range", f"{c}:{c}", "-f", str(report_csv)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                           timeout=120 + 2 * args.pa_interval * args.pa_trials)
        if p.returncode != 0 or not report_csv.exists():
            tail = (p.stdout + p.stderr).strip().splitlines()[-3:]
            out["levels"][c] = {"error": f"exit {p.returncode}: " + " | ".join(tail)}
            continue
        with report_csv.open() as f:
            row = next(csv.DictReader(f))

        def us(k: str, row: dict[str, str] = row) -> float:  # the CSV's latencies are microseconds
            return float(row.get(k) or 0) / 1e3
        out["levels"][c] = {"per_s": float(row["Inferences/Second"]), "p50_ms": us("p50 latency"),
                            "p99_ms": us("p99 latency"),
                            "server_queue_ms": us("Server Queue"),
                            "server_compute_ms": us("Server Compute Input") + us("Server Compute Infer")
                            + us("Server Compute Output"),
                            "unstable": "Failed to obtain stable measurement" in p.stdout + p.stderr}
    return out


# ---------------------------------------------------------------- one diagnoser, four ways


if __name__ == "__main__" and len(sys.argv) > 6 and sys.argv[1] == "--pytriton-child":
    pytriton_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", Path(sys.argv[6]))
