"""Run the real ``tritonserver`` shipped in the nvidia-pytriton wheel, as a context manager.

::

    with TritonServer("triton_models", grpc_port=8001) as server:
        print(server.grpc_url)          # 127.0.0.1:8001, every model ready and built

Models are *ready* (Triton's endpoint) as soon as their stub has read the config; the plugin
itself is built in the background (see :class:`hygeia.serving.adapter.TritonPythonModel`) and
its first request waits for that. ``warm=True`` (the default) makes the context manager also
wait until every plugin is built (:meth:`TritonServer.wait_warm`), so a stale or broken model
fails at start-up; ``hygeia serve`` prints the addresses when ready and each model when warm.

The server runs in its own process group; leaving the block (or :meth:`stop`) sends SIGTERM to
the group, waits ``exit_timeout`` seconds, then SIGKILLs whatever is left (Python-backend stubs
included), so no stray processes survive, and removes the shared-memory regions a killed server
left in /dev/shm.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import HygeiaError  # noqa: F401  (re-exported errors below)
from .binary import (  # noqa: F401  (public names kept here for callers)
    TritonServerError,
    backend_directory,
    free_port,
    remove_stale_regions,
    server_env,
    shm_regions,
    stub_processes,
    tritonserver_binary,
)


log = logging.getLogger(__name__)


_WARM_RE = re.compile(r"hygeia-warm (\S+) (?:ok after ([0-9.]+) s|failed: ([^\n]*))")


@dataclass
class ModelState:
    name: str
    version: str
    state: str
    reason: str = ""


class TritonServer:
    """A tritonserver process serving ``repo``; the context manager waits for readiness.

    Ports default to free ones. ``models`` limits the models loaded (explicit model control);
    ``None`` loads every model in the repository. ``log`` is the file receiving the server's
    output (a temp file by default; :meth:`log_tail` reads it).

    ``allow_failures``: serve the models that loaded even if others failed (:attr:`failed`).

    ``watchdog``: tritonserver 2.51 does not restart a Python-backend stub that died (every later
    request fails with "Stub process ... is not healthy"); the watchdog notices the dead stub and
    reloads that model (a config override forces fresh instances) so it serves again.
    """

    def __init__(self, repo: str | os.PathLike[str] = "triton_models", *, grpc_port: int | None = None,
                 http_port: int | None = None, metrics_port: int | None = None, host: str = "127.0.0.1",
                 models: Sequence[str] | None = None, exit_timeout: int = 3, startup_timeout: float = 120.0,
                 threads: int | None = None, log: str | os.PathLike[str] | None = None,
                 verbose: int = 0, extra_args: Iterable[str] = (), watchdog: bool = True,
                 allow_failures: bool = False, warm: bool = True) -> None:
        self.repo = Path(repo).resolve()
        self.host = host
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.models = list(models) if models is not None else None
        self.exit_timeout = exit_timeout
        self.startup_timeout = startup_timeout
        # torch/OpenMP threads per stub: every model is its own process, so N models x all cores
        # oversubscribes a CPU host (measured: 100x slower diffusion on a busy 2-core machine).
        # Default: OMP_NUM_THREADS if set, else 1.
        self.threads = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
        self.verbose = verbose
        self.extra_args = list(extra_args)
        self._own_log = log is None
        self.log_path = Path(log) if log else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.watchdog = watchdog
        self.allow_failures = allow_failures
        self.failed: dict[str, str] = {}  # model -> reason, for models that failed to load
        self.restarts: list[tuple[str, float]] = []  # (model, time) of each stub restart by the watchdog
        self._stop_watch = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_after: float | None = None  # seconds from launch to every model ready
        self.warm = warm
        self.warm_after: float | None = None  # seconds from launch to every plugin built
        self.warm_times: dict[str, float] = {}  # model -> seconds its build took (from the log)
        self._log_start = 0

    # ------------------------------------------------------------------ addresses
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        if not self.repo.is_dir():
            raise TritonServerError(f"model repository {self.repo} does not exist (run `hygeia triton build`)")
        cmd = [str(tritonserver_binary()), f"--model-repository={self.repo}",
               f"--backend-directory={backend_directory()}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}", "--allow-metrics=true",
               f"--exit-timeout-secs={self.exit_timeout}", f"--log-verbose={self.verbose}",
               # our configs are complete: skip the extra stub per model that auto-completion starts
               "--disable-auto-complete-config",
               # a model that fails to load must not take the others down (wait_ready reports it)
               "--exit-on-error=false"]
        # explicit model control: lets the watchdog reload a model whose stub died
        cmd += ["--model-control-mode=explicit",
                *(f"--load-model={m}" for m in (self.models if self.models is not None else ["*"]))]
        return cmd + self.extra_args

    def start(self) -> "TritonServer":
        """Launch tritonserver in a new process group (returns at once; see :meth:`wait_ready`)."""
        cmd = self.command()
        self._shm_before = shm_regions()
        logf = open(self.log_path, "ab")
        self._log_start = logf.tell()
        try:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=server_env(self.threads), start_new_session=True)
        finally:
            logf.close()
        return self

    def _get(self, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return 0, b""

    def is_ready(self) -> bool:
        return self._get("/v2/health/ready")[0] == 200

    def wait_ready(self, timeout: float | None = None) -> float:
        """Block until the server is up and every model has loaded; return seconds since launch.

        tritonserver loads the startup models before it opens its endpoints, so once it answers,
        each model is READY or failed. A failed model raises TritonServerError naming it and why,
        unless ``allow_failures`` (then it is logged and left in :attr:`failed`).
        """
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TritonServerError(f"tritonserver exited with code {self.proc.returncode} before it was "
                                        f"ready:\n{self.log_tail()}")
            if self._get("/v2/health/live")[0] == 200:
                states = [m for m in self.model_states()
                          if self.models is None or m.name in self.models]
                if states and all(m.state in ("READY", "UNAVAILABLE") for m in states):
                    self.ready_after = time.monotonic() - self.started_at
                    self.failed = {m.name: m.reason for m in states if m.state != "READY"}
                    if self.failed and not self.allow_failures:
                        self.stop()
                        raise TritonServerError("models failed to load: " + "; ".join(
                            f"{k}: {v}" for k, v in self.failed.items()))
                    for k, v in self.failed.items():
                        log.warning("tritonserver: %s failed to load: %s", k, v)
                    if self.watchdog:
                        self.start_watchdog()
                    if self.warm:
                        self.wait_warm(max(1.0, deadline - time.monotonic()))
                    return self.ready_after
            time.sleep(0.05)
        states_s = ", ".join(f"{m.name}={m.state}" for m in self.model_states())
        self.stop()
        raise TritonServerError(f"tritonserver not ready after {timeout or self.startup_timeout:.0f} s "
                                f"(models: {states_s or 'unknown'}):\n{self.log_tail()}")

    def warm_states(self) -> dict[str, tuple[bool, str]]:
        """model -> (built, detail) from the ``hygeia-warm`` lines of the log: ``(True, seconds)``
        or ``(False, reason)``. Models not built yet are absent."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                text = f.read().decode(errors="replace")
        except OSError:
            return {}
        out: dict[str, tuple[bool, str]] = {}
        for m in _WARM_RE.finditer(text):
            out[m.group(1)] = (m.group(2) is not None, m.group(2) or m.group(3).rstrip('"').strip())
        return out

    def wait_warm(self, timeout: float | None = None) -> float:
        """Block until every READY model has built its plugin; return seconds since launch.

        A model whose build failed (stale weights, missing package...) raises TritonServerError
        naming it and why, unless ``allow_failures`` (then it joins :attr:`failed`).
        """
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        models = [m.name for m in self.model_states() if m.state == "READY"
                  and (self.models is None or m.name in self.models)]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TritonServerError(f"tritonserver exited with code {self.proc.returncode} while its "
                                        f"models were being built:\n{self.log_tail()}")
            st = self.warm_states()
            if all(m in st for m in models):
                self.warm_after = time.monotonic() - self.started_at
                self.warm_times = {m: float(st[m][1]) for m in models if st[m][0]}
                bad = {m: st[m][1] for m in models if not st[m][0]}
                if bad:
                    self.failed.update(bad)
                    if not self.allow_failures:
                        self.stop()
                        raise TritonServerError("models failed to load: " + "; ".join(f"{k}: {v}" for k, v in bad.items()))
                    for k, v in bad.items():
                        log.warning("tritonserver: %s failed to build its plugin: %s", k, v)
                return self.warm_after
            time.sleep(0.1)
        st = self.warm_states()
        missing = [m for m in models if m not in st]
        self.stop()
        raise TritonServerError(f"models not built after {timeout or self.startup_timeout:.0f} s: "
                                f"{', '.join(missing)}:\n{self.log_tail()}")

    def model_states(self) -> list[ModelState]:
        code, body = self._get_index()
        if code != 200:
            return []
        return [ModelState(m.get("name", "?"), m.get("version", ""), m.get("state", "UNKNOWN"), m.get("reason", ""))
                for m in json.loads(body or b"[]")]

    def _get_index(self) -> tuple[int, bytes]:
        req = urllib.request.Request(self.http_url + "/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status, r.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return 0, b""

    # ------------------------------------------------------------------ stub watchdog
    def stubs(self) -> dict[str, set[int]]:
        """Live Python-backend stubs of this server: model -> pids (zombies have no cmdline)."""
        if self.proc is None:
            return {}
        try:
            return stub_processes(os.getpgid(self.proc.pid))
        except ProcessLookupError:
            return {}

    def stub_pids(self) -> dict[str, int]:
        """One Python-backend stub process per model: model name -> pid (Linux /proc)."""
        return {m: min(p) for m, p in self.stubs().items()}

    def reload(self, model: str) -> None:
        """Reload ``model`` with fresh instances (and stubs), even if its files did not change."""
        code, body = self._get(f"/v2/models/{model}/config", timeout=10)
        if code != 200:
            raise TritonServerError(f"cannot read the config of {model}: HTTP {code} {body[:200]!r}")
        cfg = json.loads(body)
        cfg.setdefault("parameters", {})["hygeia_restart"] = {"string_value": str(len(self.restarts) + 1)}
        req = urllib.request.Request(f"{self.http_url}/v2/repository/models/{model}/load", method="POST",
                                     data=json.dumps({"parameters": {"config": json.dumps(cfg)}}).encode())
        with urllib.request.urlopen(req, timeout=self.startup_timeout) as r:
            if r.status != 200:
                raise TritonServerError(f"reloading {model}: HTTP {r.status}")

    def _watch(self, interval: float, known: dict[str, set[int]]) -> None:
        """Every ``interval`` s: reload a model one of whose stubs in ``known`` is gone."""
        retired: set[int] = set()  # stubs of replaced instances: they exit seconds after a reload
        retry: dict[str, tuple[float, float]] = {}  # model -> (next attempt, delay) after a failed reload

        def live() -> dict[str, set[int]]:
            return {m: p - retired for m, p in self.stubs().items()}

        while not self._stop_watch.wait(interval):
            if self.proc is None or self.proc.poll() is not None:
                return
            now = live()
            for model, pids in list(known.items()):
                if not pids - now.get(model, set()):
                    continue
                if model in retry and time.monotonic() < retry[model][0]:
                    now[model] = pids  # still dead: try again when the delay is over
                    continue
                log.warning("tritonserver: the Python stub of %s died; reloading the model", model)
                retired |= now.get(model, set())  # the surviving stubs of the old instances
                try:
                    self.reload(model)
                except Exception as exc:  # noqa: BLE001 - keep watching, and try this one again
                    delay = min(30.0, 2 * retry.get(model, (0.0, 0.5))[1])
                    retry[model] = (time.monotonic() + delay, delay)
                    log.error("tritonserver: reloading %s failed (%s); trying again in %.0f s", model,
                              " ".join(str(exc).split())[:200], delay)
                    now = {**live(), model: pids}
                    continue
                retry.pop(model, None)
                self.restarts.append((model, time.time()))
                log.warning("tritonserver: %s reloaded, serving again", model)
                now = live()
            known = now

    def start_watchdog(self, interval: float = 1.0) -> None:
        if self._watch_thread is None:
            self._stop_watch.clear()
            # the stubs to watch are listed here, before the caller goes on: a stub that dies
            # between this call and the thread's first look is still noticed
            self._watch_thread = threading.Thread(target=self._watch, args=(interval, self.stubs()),
                                                  daemon=True, name="hygeia-triton-watchdog")
            self._watch_thread.start()

    def stop(self) -> int | None:
        """SIGTERM the process group, wait ``exit_timeout`` (+2 s), then SIGKILL it."""
        self._stop_watch.set()
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=5)
            self._watch_thread = None
        p = self.proc
        if p is None:
            return None
        try:
            pgid = os.getpgid(p.pid)
        except ProcessLookupError:
            pgid = p.pid
        if p.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=self.exit_timeout + 2)
            except subprocess.TimeoutExpired:
                pass
        try:  # stubs or a hung server: nothing of the group may survive
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if p.poll() is None:
            p.wait(timeout=5)
        self.proc = None
        remove_stale_regions(getattr(self, "_shm_before", set()), pgid=pgid)  # a killed server leaves its regions
        return p.returncode

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if self._own_log and exc[0] is None:
            try:
                self.log_path.unlink()
            except OSError:
                pass
