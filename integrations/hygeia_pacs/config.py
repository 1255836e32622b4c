"""Gateway configuration: a JSON (or TOML) file, every field documented in docs/gateway.md."""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hygeia.errors import InputError
from hygeia.serving.connection import split_server
from hygeia.validation import kind_error

DEFAULT_MODALITIES = ("CR", "DX", "CT", "MR", "OT")
DEFAULT_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8-bit lossy)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12-bit lossy)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)
"""Accepted at association negotiation: every syntax :mod:`hygeia.data.decode` reads (pylibjpeg)."""


def _kind_error(hint: Any, value: Any) -> str | None:
    """What ``value`` should have been for the field type ``hint``, or None if it fits."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _kind_error(next(a for a in args if a is not type(None)), value)
    if origin is tuple:  # the gateway's lists are lists of names
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return None if ok else 'a list of strings, e.g. ["A", "B"]'
    if origin is dict or dataclasses.is_dataclass(hint):
        return kind_error(dict, value)
    kind = str if hint is Path else hint
    return kind_error(kind, value) if kind in (bool, int, float, str) else None


def check_keys(cls: type, d: Any, where: str) -> None:
    """``d`` may build ``cls``: an object with only its keys, every required key, each of its kind
    (nested objects checked the same way), so a config file never half-works."""
    if not isinstance(d, dict):
        raise InputError(where, "a JSON object", got=type(d).__name__)
    fs = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(fs))
    if unknown:
        raise InputError(where, f"only the keys {', '.join(sorted(fs))}", got=f"unknown {unknown}")
    missing = [n for n, f in fs.items() if n not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InputError(where, f"the key {missing[0]}", got="none")
    hints = typing.get_type_hints(cls)
    for key, value in d.items():
        why = _kind_error(hints[key], value)
        if why is not None:
            raise InputError(f"{where} {key}", why, got=repr(value)[:80])
        nested = next((a for a in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(a)), None)
        if nested is not None and isinstance(value, dict):
            check_keys(nested, value, f"{where} {key}")


@dataclass
class TlsOptions:
    """TLS for a DICOM association (PEM files): the listener's own certificate and key, the CAs
    it trusts for client certificates; a destination's CAs (and a client certificate if asked)."""

    certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    require_client_certificate: bool = False
    server_hostname: str | None = None  # for sends: the name in the destination's certificate

    def _load(self, ctx: Any, what: str) -> Any:
        try:
            if self.certificate:
                ctx.load_cert_chain(self.certificate, self.private_key)
            if self.ca_certificates:
                ctx.load_verify_locations(self.ca_certificates)
        except (OSError, ValueError) as exc:
            raise InputError(f"gateway config {what} tls", "readable PEM certificate, key and CA files",
                             got=f"{type(exc).__name__}: {exc}") from None
        return ctx

    def server_context(self) -> Any:
        import ssl

        if not self.certificate:
            raise InputError("gateway config tls", "a certificate and private_key for the listener", got="none")
        ctx = self._load(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), "listener")
        ctx.verify_mode = ssl.CERT_REQUIRED if self.require_client_certificate else ssl.CERT_NONE
        return ctx

    def client_context(self) -> Any:
        import ssl

        return self._load(ssl.create_default_context(ssl.Purpose.SERVER_AUTH), "cstore")


@dataclass
class CStoreDestination:
    """Where SRs go by DIMSE C-STORE (``tls``: over TLS)."""

    ae_title: str
    host: str
    port: int
    tls: TlsOptions | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tls, dict):
            self.tls = TlsOptions(**self.tls)


@dataclass
class StowDestination:
    """Where SRs go by DICOMweb STOW-RS (``url`` is the DICOMweb root, e.g. http://host:8042/dicom-web)."""

    url: str
    username: str | None = None
    password: str | None = None
    password_env: str | None = None  # read the password from this environment variable instead

    def resolved_password(self) -> str | None:
        if self.password_env:
            return os.environ.get(self.password_env)
        return self.password


@dataclass
class GatewayConfig:
    """Everything the gateway needs; see docs/gateway.md for the meaning of each field."""

    spool: Path
    ae_title: str = "HYGEIA"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_callers: tuple[str, ...] = ()
    diagnoser: str | None = None  # None: the installed default diagnoser (HYGEIA_DIAGNOSER, or the spec marked default)
    diagnoser_bundle: str | None = None  # in process (and the local_fallback): a bundle folder instead of the shipped weights
    server: str | None = None  # Triton gRPC HOST:PORT; None = run the diagnoser in-process
    local_fallback: bool = False  # with a server: diagnose in process while the server cannot be reached
    fallback_probe_s: float = 10.0  # on the fallback: try the server again at most this often
    study_timeout_s: float = 10.0
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    transfer_syntaxes: tuple[str, ...] = DEFAULT_TRANSFER_SYNTAXES
    cstore: CStoreDestination | None = None
    stow: StowDestination | None = None
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    give_up_after_s: float | None = 86400.0
    batch_size: int = 16
    workers: int = 2  # studies processed at once (diagnose, SR build, send); diagnose calls never overlap
    sr_processes: int = 0  # build + encode SRs in this many separate processes (0: in the worker threads)
    keep_instances: bool = False
    poll_s: float = 0.2
    broker: str | None = None  # amqp://user:password@host:5672/vhost: studies travel through RabbitMQ
    broker_queue: str = "hygeia.studies"
    broker_delivery_limit: int = 20  # deliveries before the quorum queue dead-letters a study
    tls: TlsOptions | None = None  # the DICOM listener over TLS
    receive: bool = True  # run the DICOM listener (False: a worker that only consumes the broker queue)
    consume: bool = True  # process studies (False with a broker: a receiver that only publishes)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spool = Path(self.spool)
        if not self.allowed_callers:
            raise InputError("gateway config allowed_callers", "a non-empty list of calling AE titles",
                             got="an empty list (the gateway accepts only configured AE titles)")
        self.allowed_callers = tuple(str(a).strip() for a in self.allowed_callers)
        for a in (self.ae_title, *self.allowed_callers):
            if not a or len(a) > 16 or "\\" in a:
                raise InputError("gateway config AE title", "1-16 characters without backslash", got=repr(a))
        self.modalities = tuple(str(m).upper() for m in self.modalities)
        self.transfer_syntaxes = tuple(str(t) for t in self.transfer_syntaxes)
        from pydicom.uid import UID

        for t in self.transfer_syntaxes:
            if not UID(t).is_transfer_syntax:
                raise InputError("gateway config transfer_syntaxes", "DICOM transfer syntax UIDs", got=repr(t))
        if isinstance(self.tls, dict):
            self.tls = TlsOptions(**self.tls)
        if isinstance(self.cstore, dict):
            self.cstore = CStoreDestination(**self.cstore)
        if isinstance(self.stow, dict):
            self.stow = StowDestination(**self.stow)
        if self.cstore is None and self.stow is None:
            raise InputError("gateway config", "at least one destination: cstore and/or stow", got="none")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or not 1 <= self.workers <= 64:
            raise InputError("gateway config workers", "an integer from 1 to 64", got=repr(self.workers))
        if isinstance(self.sr_processes, bool) or not isinstance(self.sr_processes, int) or not 0 <= self.sr_processes <= 64:
            raise InputError("gateway config sr_processes", "an integer from 0 to 64 (0: no separate processes)",
                             got=repr(self.sr_processes))
        if not isinstance(self.local_fallback, bool):
            raise InputError("gateway config local_fallback", "true or false", got=repr(self.local_fallback))
        if isinstance(self.fallback_probe_s, bool) or not isinstance(self.fallback_probe_s, (int, float)) \
                or not 0 <= self.fallback_probe_s <= 3600:
            raise InputError("gateway config fallback_probe_s", "seconds from 0 to 3600", got=repr(self.fallback_probe_s))
        if self.broker is not None and not str(self.broker).startswith(("amqp://", "amqps://")):
            raise InputError("gateway config broker", "an amqp:// or amqps:// URL", got="another scheme")
        if not self.consume and self.broker is None:
            raise InputError("gateway config consume", "true unless a broker is set (someone must process studies)",
                             got="false without a broker")
        if not self.receive and self.broker is None:
            raise InputError("gateway config receive", "true unless a broker is set (a worker needs a broker queue)",
                             got="false without a broker")
        if not 0 <= self.port <= 65535:
            raise InputError("gateway config port", "a TCP port from 0 to 65535", got=self.port)
        for addr in (str(self.server).split(",") if self.server is not None else ()):
            split_server(addr.strip(), "gateway config server")
        if self.study_timeout_s <= 0 or self.retry_initial_s <= 0 or self.retry_max_s < self.retry_initial_s:
            raise InputError("gateway config timings", "study_timeout_s > 0 and 0 < retry_initial_s <= retry_max_s",
                             got=(self.study_timeout_s, self.retry_initial_s, self.retry_max_s))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GatewayConfig":
        if isinstance(d, dict) and "spool" not in d:
            raise InputError("gateway config", "a 'spool' folder (the durable queue)", got="no spool")
        check_keys(cls, d, "gateway config")
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "GatewayConfig":
        """Read a ``.json`` or ``.toml`` file; relative spool paths are relative to the file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"gateway config {str(p)!r}", "a readable JSON or TOML file", got=str(exc)) from None
        try:
            if p.suffix.lower() == ".toml":
                import tomllib

                d = tomllib.loads(text)
            else:
                d = json.loads(text)
        except ValueError as exc:
            raise InputError(f"gateway config {str(p)!r}", "valid JSON (or TOML for .toml)", got=str(exc)) from None
        if not isinstance(d, dict):
            raise InputError(f"gateway config {str(p)!r}", "a JSON object", got=type(d).__name__)
        if isinstance(d.get("spool"), str) and not Path(d["spool"]).is_absolute():
            d["spool"] = str(p.parent / d["spool"])
        return cls.from_dict(d)
