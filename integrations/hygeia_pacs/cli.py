"""``hygeia gateway run|work|status|retry`` (added to the core CLI through ``hygeia_cli_commands``)."""
from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Optional

import typer

gateway_app = typer.Typer(help="The PACS gateway: DICOM in, diagnosis, TID 1500 SR back.", no_args_is_help=True)
_CONFIG = typer.Argument(..., exists=True, dir_okay=False, help="Gateway config (.json or .toml).")
_FALLBACK = typer.Option(False, "--local-fallback",
                         help="With a server: diagnose in process while it cannot be reached (sets local_fallback).")


@gateway_app.command("run")
def run(
    config: Path = _CONFIG,
    server: Optional[str] = typer.Option(None, "--server", help="Diagnose on Triton HOST:PORT[,HOST:PORT] (overrides config)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every instance and association."),
    local_fallback: bool = _FALLBACK,
) -> None:
    """Run the gateway: C-STORE in, diagnosis, TID 1500 SR back to the PACS (C-STORE/STOW-RS)."""
    _serve(config, server, verbose, work_only=False, local_fallback=local_fallback)


@gateway_app.command("work")
def work(
    config: Path = _CONFIG,
    server: Optional[str] = typer.Option(None, "--server", help="Diagnose on Triton HOST:PORT[,HOST:PORT] (overrides config)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    local_fallback: bool = _FALLBACK,
) -> None:
    """A worker without a DICOM listener: process studies from the config's broker queue."""
    _serve(config, server, verbose, work_only=True, local_fallback=local_fallback)


@gateway_app.command("status")
def status(config: Path = _CONFIG) -> None:
    """The queue as JSON: counts, and every failed (dead-lettered) study with its reason."""
    from .config import GatewayConfig
    from .spool import Spool

    cfg = GatewayConfig.load(config)
    spool = Spool(cfg.spool)
    out: dict[str, Any] = {**spool.summary(), "failures": spool.failures()}
    if cfg.broker:
        from .broker import status as broker_status

        out["broker"] = broker_status(cfg.broker, cfg.broker_queue, cfg.broker_delivery_limit)
    typer.echo(json.dumps(out, indent=2))


@gateway_app.command("retry")
def retry(config: Path = _CONFIG) -> None:
    """Send every failed (dead-lettered) study again."""
    from .config import GatewayConfig
    from .spool import Spool

    cfg = GatewayConfig.load(config)
    moved = Spool(cfg.spool).retry_failed()
    if cfg.broker:
        from .broker import BrokerQueue

        from .broker import BrokerError, describe

        q = BrokerQueue(cfg.broker, cfg.broker_queue, cfg.broker_delivery_limit)
        try:
            moved += q.retry_dead()
        except Exception as exc:  # pika's connection and channel errors: one line, no password
            raise BrokerError(f"broker {describe(cfg.broker)}: {type(exc).__name__}: {str(exc)[:200]}") from None
        finally:
            q.close()
    typer.echo(f"{moved} stud{'y' if moved == 1 else 'ies'} queued again")


def load_config(config: Path, server: Optional[str] = None, local_fallback: bool = False) -> Any:
    """The config file with the command line's overrides (``--server``, ``--local-fallback``)."""
    from .config import GatewayConfig

    import dataclasses

    cfg = GatewayConfig.load(config)
    changes: dict[str, Any] = {}
    if server:
        changes["server"] = server
    if local_fallback:
        changes["local_fallback"] = True
    return dataclasses.replace(cfg, **changes) if changes else cfg  # checked again, as from the file


def _serve(config: Path, server: Optional[str], verbose: bool, work_only: bool, local_fallback: bool = False) -> None:
    from .gateway import Gateway

    cfg = load_config(config, server, local_fallback)
    if work_only:
        if not cfg.broker:
            from hygeia.errors import InputError

            raise InputError("gateway config broker", "an amqp:// URL (a worker consumes the broker queue)", got="none")
        cfg.receive = False
    _setup_logging(verbose)
    gw = Gateway(cfg).start()
    stop = threading.Event()

    def _handle(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    where = "worker" if work_only else f"{cfg.ae_title} on {cfg.host}:{cfg.port}"
    typer.echo(f"hygeia gateway {where} (Ctrl-C stops)", err=True)
    while not stop.wait(0.5):
        pass
    gw.stop()
    typer.echo(f"stopped: {json.dumps(gw.status())}", err=True)


def register(app: typer.Typer) -> None:
    """Add ``hygeia gateway ...`` to the ``hygeia`` app."""
    app.add_typer(gateway_app, name="gateway")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logger = logging.getLogger("hygeia_pacs")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        logger.addHandler(RichHandler(show_path=False, markup=False))
        logger.propagate = False
    logging.getLogger("pynetdicom").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("pika").setLevel(logging.WARNING)
