"""Sending an SR to the PACS: DIMSE C-STORE (pynetdicom) and DICOMweb STOW-RS (dicomweb-client).

Each sender raises :class:`TransientError` when retrying later may help (connection refused,
association rejected or aborted, HTTP 5xx, time-outs) and :class:`PermanentError` when the PACS
refused the object itself (a C-STORE failure status, STOW-RS items in FailedSOPSequence, HTTP 4xx).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import CStoreDestination, StowDestination


class TransientError(Exception):
    """Worth retrying later (PACS or network down)."""


class PermanentError(Exception):
    """The object was refused; retrying the same object will not help."""


def send_cstore(ds: Any, dest: CStoreDestination, calling_ae: str, timeout_s: float = 30.0) -> None:
    """C-STORE ``ds`` to ``dest``; returns on status Success (0x0000) or a warning (0xB000-0xBFFF).

    ``ds``: a pydicom Dataset, or the path of a PS3.10 file, which is sent as it is on disk
    (no decoding and re-encoding).
    """
    from pynetdicom import AE

    if isinstance(ds, (str, os.PathLike)):
        from pydicom.filereader import read_file_meta_info

        meta = read_file_meta_info(ds)
        sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        ds = Path(ds)
    else:
        sop_class, syntax = str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(sop_class, syntax)
    if syntax != "1.2.840.10008.1.2.1" and not isinstance(ds, Path):  # a Dataset can be re-encoded
        ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
    tls = None
    if dest.tls is not None:
        tls = (dest.tls.client_context(), dest.tls.server_hostname or dest.host)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise TransientError(f"C-STORE association to {dest.ae_title}@{dest.host}:{dest.port} {reason}")
    _no_nagle(assoc)
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    check_cstore_status(status, dest)


def check_cstore_status(status: Any, dest: CStoreDestination) -> None:
    """Return on Success or a warning; raise TransientError or PermanentError otherwise."""
    if not status or "Status" not in status:
        raise TransientError(f"C-STORE to {dest.ae_title}: no response (connection lost or time-out)")
    code = int(status.Status)
    if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
        return
    comment = str(getattr(status, "ErrorComment", ""))
    if code in (0xA700, 0xA701, 0xA702) or 0xA700 <= code <= 0xA7FF:  # out of resources: try later
        raise TransientError(f"C-STORE to {dest.ae_title}: status 0x{code:04X} (out of resources) {comment}")
    raise PermanentError(f"C-STORE to {dest.ae_title}: failure status 0x{code:04X} {comment}".strip())


class CStoreLink:
    """One sender's association to a C-STORE destination, kept open from one SR to the next.

    An association per SR costs a negotiation (and a thread) each time; a kept one is re-opened
    when the peer closed it (its idle time-out), when an SR needs another SOP class or transfer
    syntax, or after a failed send. A send on a kept association that gets no answer is tried once
    more on a fresh one; only then is the error returned (TransientError).
    """

    def __init__(self, dest: CStoreDestination, calling_ae: str, timeout_s: float = 30.0) -> None:
        self.dest, self.calling_ae, self.timeout_s = dest, calling_ae, timeout_s
        self._assoc: Any = None
        self._context: tuple[str, str] | None = None

    def _open(self, context: tuple[str, str]) -> None:
        from pynetdicom import AE

        self.close()
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.add_requested_context(*context)
        dest = self.dest
        tls = (dest.tls.client_context(), dest.tls.server_hostname or dest.host) if dest.tls is not None else None
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
        if not assoc.is_established:
            reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            raise TransientError(f"C-STORE association to {dest.ae_title}@{dest.host}:{dest.port} {reason}")
        _no_nagle(assoc)
        self._assoc, self._context = assoc, context

    def send(self, path: str | os.PathLike[str]) -> None:
        """C-STORE the PS3.10 file at ``path`` as it is on disk."""
        from pydicom.filereader import read_file_meta_info

        meta = read_file_meta_info(path)
        context = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        status = None
        for fresh in (False, True):
            kept = self._assoc is not None and self._assoc.is_established and self._context == context
            if fresh or not kept:
                self._open(context)
            try:
                status = self._assoc.send_c_store(Path(path))
            except (RuntimeError, OSError, ValueError):  # the association went away under us
                status = None
            if status and "Status" in status:
                break
            self.close()
            if not kept:
                break  # a fresh association got no answer either
        check_cstore_status(status, self.dest)

    def close(self) -> None:
        """Release the association (abort it if the release fails)."""
        assoc, self._assoc, self._context = self._assoc, None, None
        if assoc is not None and assoc.is_established:
            try:
                assoc.release()
            except Exception:  # the peer is gone: nothing to release
                assoc.abort()


def _no_nagle(assoc: Any) -> None:
    """TCP_NODELAY on the association's socket. A C-STORE request is written as several PDUs
    (command, then data set); with Nagle's algorithm the data set waits for the peer's delayed ACK
    of the command (~40 ms on Linux): a C-STORE of an SR to Orthanc took ~100 ms instead of ~55."""
    import socket

    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # no TCP socket (closed meanwhile): nothing to tune
        pass


def send_stow(ds: Any, dest: StowDestination, timeout_s: float = 30.0) -> None:
    """STOW-RS ``ds`` to ``dest.url``; success means an empty (or absent) FailedSOPSequence."""
    import requests
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    http = None  # requests' connection state with basic auth, when credentials are set
    password = dest.resolved_password()
    if dest.username is not None:
        http = create_session_from_user_pass(dest.username, password or "")
    client = DICOMwebClient(url=dest.url, session=http)  # the library's keyword
    try:
        resp = client.store_instances(datasets=[ds])
    except requests.exceptions.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        if code >= 500 or code in (408, 429) or code == 0:
            raise TransientError(f"STOW-RS to {dest.url}: HTTP {code}") from None
        raise PermanentError(f"STOW-RS to {dest.url}: HTTP {code}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise TransientError(f"STOW-RS to {dest.url}: {type(exc).__name__}") from None
    failed = getattr(resp, "FailedSOPSequence", None) if resp is not None else None
    if failed is not None and len(failed) > 0:
        reasons = [str(getattr(item, "FailureReason", "?")) for item in failed]
        raise PermanentError(f"STOW-RS to {dest.url}: {len(failed)} instance(s) failed, reasons {reasons}")
