"""`hygeia triton build --target container`: the repository runs on a stock Triton from its packed
environment alone.

The stand-in for NVIDIA's stock container is the same Triton release (2.51) from the
nvidia-pytriton wheel, run the way the container runs it: a backends folder whose Python-backend
stub is the one for Python 3.10 (the container's), and an environment without this venv
(PATH=/usr/bin:/bin, no LD_LIBRARY_PATH, no PYTHONPATH; this machine has no Python 3.10). So the
model can only run through what the build packed: the 3.11 stub in its folder and
``hygeia-python3.11.tar.gz``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton")

from hygeia.serving.binary import _pytriton_root, free_port, stub_path, stub_processes, tritonserver_binary  # noqa: E402
from hygeia.serving.pack import CONTAINER_GLIBC, ENV_FILE, ENV_VALUE, STUB, pack_repository  # noqa: E402
from hygeia.serving.repository import build_repository  # noqa: E402

from triton_calls import infer  # noqa: E402


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("container") / "repo"
    res = build_repository(repo, names=["cnn"], execution_env=ENV_VALUE)
    assert res.models == ["diagnoser_cnn"], res.failed
    return repo, pack_repository(repo, res.models)


def test_the_pack_holds_what_the_frozen_model_imports_and_no_more(packed) -> None:
    repo, r = packed
    assert r.path == repo / ENV_FILE and r.size_bytes > 10e6
    assert {"hygeia", "hygeia_cnn", "numpy", "onnxruntime"} <= set(r.modules)
    assert "torch" not in r.modules and "torch" not in r.distributions  # frozen: ONNX Runtime only
    assert r.glibc <= CONTAINER_GLIBC and "libssl.so.3" in r.system_libs
    assert (repo / "diagnoser_cnn" / STUB).stat().st_mode & 0o111
    assert f'string_value: "{ENV_VALUE}"' in (repo / "diagnoser_cnn" / "config.pbtxt").read_text()


def test_the_packed_python_runs_on_its_own(packed, tmp_path: Path) -> None:
    """Unpacked and activated as Triton does, without this venv: the interpreter finds its own
    standard library (with the extension modules a stub's imports reach) and packages."""
    import tarfile

    repo, _ = packed
    with tarfile.open(repo / ENV_FILE) as tar:
        tar.extractall(tmp_path / "env", filter="tar")
    code = ("import sys, ssl, sqlite3, unittest, ctypes, lzma, bz2, uuid, decimal, numpy, onnxruntime, hygeia; "
            "print(sys.prefix, hygeia.__file__)")
    r = subprocess.run(["bash", "-c", f"source {tmp_path}/env/bin/activate && exec python3 -c '{code}'"],
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LD_LIBRARY_PATH": f"{tmp_path}/env/lib"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    prefix, module = r.stdout.split()
    assert Path(prefix) == tmp_path / "env" and Path(module).is_relative_to(tmp_path / "env")


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(url)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "tritonserver exited"
        try:
            if c.is_model_ready("diagnoser_cnn"):
                return
        except Exception:  # noqa: BLE001  (not listening yet)
            pass
        time.sleep(0.5)
    raise AssertionError("diagnoser_cnn not ready")


def test_a_stock_triton_serves_it_from_the_packed_environment(packed, tmp_path: Path) -> None:
    import hygeia
    from hygeia_lab.phantoms import make_phantom_set

    repo, _ = packed
    # The stock container's backends folder: the Python backend with the stub of its own Python, 3.10.
    root = _pytriton_root()
    backends = tmp_path / "backends"
    shutil.copytree(root / "backends", backends)
    shutil.copy2(stub_path("3.10"), backends / "python" / STUB)
    ports = [free_port() for _ in range(3)]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    log = (tmp_path / "triton.log").open("w")
    proc = subprocess.Popen(
        [str(tritonserver_binary()), f"--model-repository={repo}", f"--backend-directory={backends}",
         "--http-address=127.0.0.1", f"--http-port={ports[0]}", "--grpc-address=127.0.0.1",
         f"--grpc-port={ports[1]}", "--allow-metrics=false", "--exit-timeout-secs=5"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"127.0.0.1:{ports[1]}"
        _wait_ready(url, proc)
        images = make_phantom_set(4, split="test", size=64).images.astype(np.float32)
        served = infer(url, "diagnoser_cnn", {"IMAGES": images}, ["PROBS"]).as_numpy("PROBS")
        local = hygeia.create("diagnoser", "cnn").diagnose(images, heatmaps=False)
        want = np.asarray([[f.probability for f in d.findings] for d in local])
        assert np.abs(served - want).max() < 1e-4
        stubs = {p for ps in stub_processes(os.getpgid(proc.pid)).values() for p in ps}
        assert stubs
        for pid in stubs:  # the interpreter is the packed one, unpacked by Triton
            maps = Path(f"/proc/{pid}/maps").read_text()
            libpy = {line.split()[-1] for line in maps.splitlines() if "libpython3" in line}
            assert libpy and all(p.startswith("/tmp/python_env_") for p in libpy), libpy  # Triton unpacks there
    finally:
        with contextlib.suppress(ProcessLookupError):  # the server (and its stubs) may have exited already
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def test_a_pack_that_needs_a_newer_glibc_is_refused_and_the_old_one_kept(packed) -> None:
    from hygeia.serving.pack import PackError

    repo, r = packed
    before = (repo / ENV_FILE).stat().st_mtime_ns
    with pytest.raises(PackError, match=r"needs glibc 2\.\d+, newer than the container's 2\.17"):
        pack_repository(repo, glibc=(2, 17))
    assert (repo / ENV_FILE).stat().st_mtime_ns == before
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no partial tarball left
