"""Hygeia PACS gateway: receives images by DICOM C-STORE, diagnoses them (locally or on Triton),
and sends a TID 1500 SR back to the PACS by C-STORE and/or DICOMweb STOW-RS.

``hygeia gateway run CONFIG`` runs it; ``work``, ``status`` and ``retry`` manage a broker queue and
failures (the commands are added through ``hygeia_cli_commands``).
"""
from __future__ import annotations

from typing import Any

from hygeia import hookimpl

__all__ = ["Gateway", "GatewayConfig"]


def __getattr__(name: str) -> Any:  # lazy: pynetdicom is needed only when the gateway runs
    if name == "Gateway":
        from .gateway import Gateway

        return Gateway
    if name == "GatewayConfig":
        from .config import GatewayConfig

        return GatewayConfig
    raise AttributeError(name)


@hookimpl
def hygeia_cli_commands(app: Any) -> None:
    from .cli import register

    register(app)
