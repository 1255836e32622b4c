"""A real tritonserver's life: `hygeia serve` start and stop, crashed stubs, TLS, stale and
slow-building models, the watchdog. No mocks: each test starts its own server."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from hygeia.serving import connect, wire  # noqa: E402
from hygeia.serving.remote import RemoteError  # noqa: E402
from hygeia.serving.server import TritonServer  # noqa: E402
from triton_calls import infer as _infer  # noqa: E402


def _procs(needle: bytes) -> set[int]:
    """PIDs whose command line contains ``needle`` (Linux /proc)."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "cmdline").read_bytes():
                    out.add(int(d.name))
            except OSError:
                pass
    return out


def test_serve_command_starts_and_stops_cleanly(triton_repo: Path) -> None:
    """`hygeia serve` in a subprocess: prints the addresses when ready; SIGTERM leaves no process."""
    from hygeia.serving.server import free_port

    g, h, m = free_port(), free_port(), free_port()
    before = _procs(b"triton_python_backend_stub")
    code = "import typer; from hygeia.serving.cli import register; app = typer.Typer(); register(app); app()"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--repo", str(triton_repo), "--no-build",
                             "--model", "conditioner_label", "--grpc-port", str(g), "--http-port", str(h),
                             "--metrics-port", str(m)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 180
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("metrics"):
                break
        out = "".join(lines)
        assert f"127.0.0.1:{g}" in out and f":{h}" in out and f":{m}/metrics" in out, out
        assert connect("conditioner", "label", f"127.0.0.1:{g}").encode(["normal"]).shape == (1, 32)
        server = _procs(f"--grpc-port={g}".encode())
        stubs = _procs(b"triton_python_backend_stub") - before
        assert len(server) == 1 and stubs
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        time.sleep(0.5)
        left = (server | stubs) & (_procs(f"--grpc-port={g}".encode()) | _procs(b"triton_python_backend_stub"))
        assert not left, f"processes survived: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_crashed_stub_is_reported_and_model_comes_back(triton_repo: Path) -> None:
    """Kill the Python-backend stub. tritonserver 2.51 reports it ("Stub process ... is not healthy")
    but never restarts it; TritonServer's watchdog reloads the model, and the remote client
    retries through the restart on its own."""
    with TritonServer(triton_repo, models=["conditioner_label"]) as server:
        url = server.grpc_url
        good = {"CONDITION": wire.encode_strings(["effusion"])}
        assert _infer(url, "conditioner_label", good).as_numpy("EMBEDDING").shape == (1, 32)
        pid = server.stub_pids()["conditioner_label"]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(InferenceServerException) as ei:  # the crash is reported, not hidden
            _infer(url, "conditioner_label", good)
        assert "not healthy" in ei.value.message()
        deadline = time.monotonic() + 90
        while True:  # the watchdog reloads the model
            try:
                assert _infer(url, "conditioner_label", good).as_numpy("EMBEDDING").shape == (1, 32)
                break
            except InferenceServerException:
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.5)
        assert [m for m, _ in server.restarts] == ["conditioner_label"]
        assert server.stub_pids()["conditioner_label"] != pid
        # a second crash: the Hygeia client retries (back-off) until the model serves again
        os.kill(server.stub_pids()["conditioner_label"], signal.SIGKILL)
        remote = connect("conditioner", "label", url, retries=7, backoff=0.5)
        assert remote.encode(["normal"]).shape == (1, 32)
        assert len(server.restarts) == 2


def test_tls_and_auth_header(triton_repo: Path, tmp_path: Path) -> None:
    """gRPC over TLS (self-signed certificate) with inference restricted to a header key."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    extra = ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}",
             "--grpc-restricted-protocol=inference,model-config:x-hygeia-key=s3cret"]
    with TritonServer(triton_repo, models=["conditioner_label"], extra_args=extra) as server:
        url = server.grpc_url
        ok = connect("conditioner", "label", url, root_certificates=str(cert), headers={"triton-grpc-protocol-x-hygeia-key": "s3cret"})
        assert ok.encode(["effusion"]).shape == (1, 32)
        from hygeia.serving.remote import RemoteError

        with pytest.raises(RemoteError, match="x-hygeia-key"):  # no key: refused, and the server says why
            connect("conditioner", "label", url, root_certificates=str(cert), retries=0)
        with pytest.raises(RemoteError):  # plain text against a TLS port
            connect("conditioner", "label", url, headers={"triton-grpc-protocol-x-hygeia-key": "s3cret"}, retries=0, timeout=5)


def test_stale_model_refuses_to_load(triton_repo: Path, tmp_path: Path) -> None:
    """A config whose weights hash no longer matches the installed plugin does not serve wrong provenance."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(triton_repo / "conditioner_label", repo / "conditioner_label")
    cfg = repo / "conditioner_label" / "config.pbtxt"
    cfg.write_text(re.sub(r'(key: "hygeia_weights_sha256"\n  value: \{ string_value: ")[0-9a-f]*', r"\g<1>" + "0" * 64,
                          cfg.read_text()))
    from hygeia.serving.server import TritonServerError

    with pytest.raises(TritonServerError, match="conditioner_label.*stale.*hygeia triton build"):
        with TritonServer(repo):
            pass


def test_model_ready_before_its_plugin_is_built_and_a_failed_build_is_named(triton_repo: Path, tmp_path: Path) -> None:
    """Models are ready as soon as the stub reads its config (plugins build in the background,
    the first request waits); a plugin whose build fails answers every request with the reason."""
    import shutil

    repo = tmp_path / "repo"
    for m in ("conditioner_label", "generator_phantom"):
        shutil.copytree(triton_repo / m, repo / m)
    cfg = repo / "conditioner_label" / "config.pbtxt"
    cfg.write_text(re.sub(r'(key: "hygeia_weights_sha256"\n  value: \{ string_value: ")[0-9a-f]*', r"\g<1>" + "0" * 64,
                          cfg.read_text()))
    with TritonServer(repo, warm=False) as server:
        assert not server.failed and server.warm_after is None  # both READY for Triton
        # the first request waits for the build, then is served
        assert len(connect("generator", "phantom", server.grpc_url).generate(1, seed=0)) == 1
        with pytest.raises(RemoteError, match="stale.*hygeia triton build"):
            connect("conditioner", "label", server.grpc_url, retries=0).encode(["normal"])
        server.allow_failures = True
        server.wait_warm(60)
        assert set(server.failed) == {"conditioner_label"} and "stale" in server.failed["conditioner_label"]
        assert set(server.warm_times) == {"generator_phantom"} and server.warm_after >= server.ready_after
        # still serving after the refused requests
        assert len(connect("generator", "phantom", server.grpc_url).generate(2, seed=1)) == 2


def test_watchdog_reloads_a_multi_instance_model_once(triton_repo: Path) -> None:
    """Kill one of the cnn's two stubs: the watchdog reloads the model once. The replaced
    instance's surviving stub exits only after the new stubs are up; that exit is not a death
    (counted as one, it made the watchdog reload the model in a loop)."""
    if not (triton_repo / "diagnoser_cnn").is_dir():
        pytest.skip("diagnoser_cnn not built")
    with TritonServer(triton_repo, models=["diagnoser_cnn"]) as server:
        url = server.grpc_url
        image = {"IMAGES": np.zeros((1, 1, 64, 64), np.float32)}
        old = server.stubs()["diagnoser_cnn"]
        assert len(old) == 2, server.stubs()
        os.kill(min(old), signal.SIGKILL)
        deadline = time.monotonic() + 90
        while not server.restarts:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.5)
        time.sleep(5)  # five watchdog ticks
        assert [m for m, _ in server.restarts] == ["diagnoser_cnn"], server.restarts
        new = server.stubs()["diagnoser_cnn"]
        assert len(new) == 2 and not (new & old)
        assert _infer(url, "diagnoser_cnn", image, ["PROBS"]).as_numpy("PROBS").shape[-1] == 5


def test_watchdog_tries_a_failed_reload_again(triton_repo: Path) -> None:
    """A reload that fails (a busy server, say) is tried again after a short delay: the model
    does not stay with a dead stub."""
    from hygeia.serving.binary import TritonServerError

    if not (triton_repo / "diagnoser_cnn").is_dir():
        pytest.skip("diagnoser_cnn not built")
    with TritonServer(triton_repo, models=["diagnoser_cnn"]) as server:
        real, calls = server.reload, []

        def flaky(model: str) -> None:
            calls.append(model)
            if len(calls) == 1:
                raise TritonServerError("refused once by the test")
            real(model)

        server.reload = flaky  # type: ignore[method-assign]
        old = server.stubs()["diagnoser_cnn"]
        os.kill(min(old), signal.SIGKILL)
        deadline = time.monotonic() + 90
        while not server.restarts:
            assert time.monotonic() < deadline, (calls, server.log_tail())
            time.sleep(0.5)
        assert calls == ["diagnoser_cnn", "diagnoser_cnn"] and [m for m, _ in server.restarts] == ["diagnoser_cnn"]
        image = {"IMAGES": np.zeros((1, 1, 64, 64), np.float32)}
        assert _infer(server.grpc_url, "diagnoser_cnn", image, ["PROBS"]).as_numpy("PROBS").shape[-1] == 5
