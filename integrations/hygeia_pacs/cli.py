"""``hygeia gateway``: run the PACS gateway (added to the core CLI through ``hygeia_cli_commands``)."""
from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the ``gateway`` command to the ``hygeia`` app."""

    @app.command()
    def gateway(
        config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Gateway config (.json or .toml)."),
        server: Optional[str] = typer.Option(None, "--server", help="Diagnose on Triton HOST:PORT (overrides config)."),
        status: bool = typer.Option(False, "--status", help="Print the queue's state as JSON and exit."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every instance and association."),
    ) -> None:
        """Run the DICOM gateway: C-STORE in, diagnosis, TID 1500 SR back to the PACS (C-STORE/STOW-RS)."""
        from .config import GatewayConfig
        from .gateway import Gateway
        from .spool import Spool

        cfg = GatewayConfig.load(config)
        if server:
            cfg.server = server
        if status:
            typer.echo(json.dumps(Spool(cfg.spool).summary(), indent=2))
            return
        _setup_logging(verbose)
        gw = Gateway(cfg).start()
        stop = threading.Event()

        def _handle(signum: int, frame: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _handle)
        signal.signal(signal.SIGINT, _handle)
        typer.echo(f"hygeia gateway {cfg.ae_title} on {cfg.host}:{cfg.port} (Ctrl-C stops)", err=True)
        while not stop.wait(0.5):
            pass
        gw.stop()
        typer.echo(f"stopped: {json.dumps(gw.status())}", err=True)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logger = logging.getLogger("hygeia_pacs")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        logger.addHandler(RichHandler(show_path=False, markup=False))
        logger.propagate = False
    logging.getLogger("pynetdicom").setLevel(logging.INFO if verbose else logging.WARNING)
