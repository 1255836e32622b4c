"""``hygeia serve`` and ``hygeia triton build``: mounted on the main CLI by :func:`register`."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True)
DEFAULT_REPO = Path("triton_models")


def _bundles(pairs: list[str] | None) -> dict[str, str]:
    """``--bundle NAME=PATH`` options -> {name: path}."""
    from ..errors import InputError

    out: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError("--bundle", "NAME=PATH (a plugin name and a bundle folder)", got=repr(pair))
        out[name.strip()] = path.strip()
    return out


def _build(repo: Path, device: str, instances: int | None, queue_delay_us: int, plugins: list[str] | None,
           quiet: bool = False, runtime: str = "auto", bundles: dict[str, str] | None = None,
           execution_env: str | None = None) -> Any:
    from .repository import build_repository

    if device not in ("cpu", "gpu", "auto"):  # `triton build` and `serve` alike
        from ..errors import InputError

        raise InputError("--device", "cpu, gpu or auto", got=repr(device))
    with err.status(f"building Triton repository {repo} (instantiating each plugin once)...", spinner="dots"):
        res = build_repository(repo, device=device, instances=instances,  # type: ignore[arg-type]
                               queue_delay_us=queue_delay_us, names=plugins or None, runtime=runtime,
                               bundles=bundles, execution_env=execution_env)
    if not quiet:
        t = Table("model", "status", "served as", title=f"Triton repository {repo.resolve()}")
        for m in res.written:
            t.add_row(m, "[green]written[/]", _served_as(repo / m))
        for m in res.unchanged:
            t.add_row(m, "unchanged", _served_as(repo / m))
        for m in res.removed:
            t.add_row(m, "[yellow]removed (plugin no longer installed)[/]")
        for m, e in res.failed.items():
            t.add_row(m, f"[red]failed: {e}[/]")
        err.print(t)
    elif res.failed:
        for m, e in res.failed.items():
            err.print(f"[red]warning:[/] {m} left out: {e}", highlight=False)
    return res


def _served_as(model_dir: Path) -> str:
    """How the stub will run the model: frozen (no torch) or the plugin (with its runtime)."""
    from .runtime import FROZEN_PARAM, config_params

    p = config_params(model_dir / "config.pbtxt")
    if p.get(FROZEN_PARAM):
        return "frozen (no torch)"
    return f"plugin ({p['hygeia_runtime']})" if p.get("hygeia_runtime") else "plugin"


def _check(server: str, timeout: float) -> None:
    from .launch import check

    live, ready, states = check(server, timeout=timeout)
    t = Table("model", "version", "state", "reason", title=f"Triton at {server}: live={live} ready={ready}")
    for m in states:
        style = "green" if m.state == "READY" else "red"
        t.add_row(m.name, m.version, f"[{style}]{m.state}[/]", m.reason)
    console.print(t)
    all_ready = ready and bool(states) and all(m.state == "READY" for m in states)
    raise typer.Exit(0 if all_ready else 1)


def triton_build(
    repo: Path = typer.Option(DEFAULT_REPO, "--repo", "-r", help="Model repository folder to write/refresh."),
    device: str = typer.Option("cpu", "--device", help="Instance kind: cpu (KIND_CPU), gpu (KIND_GPU) or auto."),
    instances: Optional[int] = typer.Option(
        None, "--instances", min=1,
        help="Model instances (stub processes) per plugin. Default: on a CPU host 2 per diagnoser and "
             "generator (1 on a 1-core host), 1 per conditioner; on a GPU host 1 per GPU."),
    queue_delay_us: int = typer.Option(0, "--queue-delay-us", min=0,
                                       help="Dynamic batching: max queue delay (microseconds)."),
    plugin: Optional[list[str]] = typer.Option(None, "--plugin", "-p", help="Only these plugins (repeatable)."),
    runtime: str = typer.Option("auto", "--runtime",
                                help="Diagnoser networks: auto (measure eager, torchscript, onnx; keep the fastest), "
                                     "onnx, torchscript or eager."),
    bundle: Optional[list[str]] = typer.Option(
        None, "--bundle", help="NAME=PATH: serve this bundle (e.g. from `hygeia train NAME --data`) instead of "
                               "the plugin's shipped weights; copied into the repository (repeatable)."),
    target: str = typer.Option(
        "embedded", "--target",
        help="embedded (`hygeia serve`, this venv's Python) or container: also pack this Python and what the "
             "models import into the repository, with the matching stub, so it runs unchanged in NVIDIA's "
             "stock tritonserver:24.10-py3 image."),
) -> None:
    """Write one Triton model per installed plugin (third-party ones included)."""
    if target not in ("embedded", "container"):
        from ..errors import InputError

        raise InputError("--target", "embedded or container", got=repr(target))
    if runtime not in ("auto", "onnx", "torchscript", "eager"):
        from ..errors import InputError

        raise InputError("--runtime", "auto, onnx, torchscript or eager", got=repr(runtime))
    from .pack import ENV_VALUE

    res = _build(repo, device, instances, queue_delay_us, plugin, runtime=runtime, bundles=_bundles(bundle),
                 execution_env=ENV_VALUE if target == "container" else None)
    if res.failed:
        raise typer.Exit(1)
    if target == "container":
        _pack(repo, res.models)


def _pack(repo: Path, models: list[str]) -> None:
    from .pack import pack_repository

    with err.status("packing the execution environment...", spinner="dots") as status:
        r = pack_repository(repo, models, progress=lambda m: status.update(m))
    err.print(f"packed {r.path} ({r.size_bytes / 1e6:.0f} MB, {r.files} files): Python "
              f"{sys.version_info.major}.{sys.version_info.minor}, {len(r.distributions)} distributions "
              f"({', '.join(r.distributions)}), {len(r.system_libs)} system libraries from the container's Python; "
              f"needs glibc >= 2.{r.glibc[1]}; the stub in each of {len(models)} model folders", highlight=False)


def serve(
    repo: Path = typer.Option(DEFAULT_REPO, "--repo", "-r", help="Model repository folder."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port."),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP port (health, metadata)."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Prometheus metrics port (/metrics)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    build_first: bool = typer.Option(True, "--build/--no-build",
                                     help="Refresh the repository from the installed plugins first."),
    device: str = typer.Option("cpu", "--device", help="Instance kind when building: cpu, gpu or auto."),
    instances: Optional[int] = typer.Option(
        None, "--instances", min=1, help="Instances per plugin when building (default: as `triton build`)."),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m",
                                              help="Load only these Triton models (repeatable)."),
    check: Optional[str] = typer.Option(None, "--check", metavar="HOST:PORT",
                                        help="Do not serve: print the state of every model of that server."),
    timeout: float = typer.Option(120.0, "--timeout", min=0.1, help="Seconds to wait for readiness (or --check)."),
    log: Optional[Path] = typer.Option(None, "--log", help="Write tritonserver's log here."),
    verbose: int = typer.Option(0, "--log-verbose", help="tritonserver --log-verbose level."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="torch/OpenMP threads per model (default: $OMP_NUM_THREADS or 1)."),
) -> None:
    """Serve every plugin with the embedded tritonserver until Ctrl-C / SIGTERM."""
    if check:
        _check(check, timeout=min(timeout, 30.0))
        return
    from .server import TritonServer

    if build_first:
        _build(repo, device, instances, 0, None, quiet=True)
    server = TritonServer(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                          host=host, models=model, startup_timeout=timeout, log=log, verbose=verbose,
                          allow_failures=True, threads=threads, warm=False)
    stop = {"signal": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
        with err.status("starting tritonserver...", spinner="dots"):
            took = server.wait_ready()
        states = [m for m in server.model_states() if m.state == "READY"]
        for name, reason in server.failed.items():
            err.print(f"[red]{name} failed to load:[/] {reason}", highlight=False)
        err.print(f"[green]ready[/] in {took:.1f} s: {len(states)} model(s) "
                  f"({', '.join(m.name for m in states)})", highlight=False)
        console.print(f"gRPC     {server.grpc_url}", highlight=False)
        console.print(f"HTTP     {server.http_url}", highlight=False)
        console.print(f"metrics  {server.metrics_url}", highlight=False)
        console.print(f"log      {server.log_path}", highlight=False)
        sys.stdout.flush()
        _report_builds_until_exit(server, {m.name for m in states})
        code = server.proc.returncode if server.proc is not None else 0
        err.print(f"[red]tritonserver exited[/] with code {code}:\n{server.log_tail(2000)}", highlight=False)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        err.print("stopping tritonserver...", highlight=False)
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, old)


def _report_builds_until_exit(server: Any, pending: set[str]) -> None:
    """Print each ``pending`` model's build outcome as it arrives (models answer once ready; each
    plugin is built in the background and its first requests wait); return when tritonserver exits."""
    while server.proc is not None and server.proc.poll() is None:
        if pending:
            for name, (ok, detail) in server.warm_states().items():
                if name in pending:
                    pending.discard(name)
                    if ok:
                        err.print(f"{name} built in {detail} s", highlight=False)
                    else:
                        err.print(f"[red]{name} cannot serve:[/] {detail}", highlight=False)
            if not pending:
                err.print(f"[green]all models built[/] {time.monotonic() - server.started_at:.1f} s "
                          "after launch", highlight=False)
        time.sleep(0.2)


def register(app: typer.Typer) -> None:
    """Add ``serve`` and the ``triton`` sub-app (``build``) to ``app``."""
    triton_app = typer.Typer(help="Triton model repository tools.", no_args_is_help=True)
    triton_app.command("build")(triton_build)
    app.add_typer(triton_app, name="triton")
    app.command("serve")(serve)
