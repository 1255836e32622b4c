"""The gateway's DICOM side: a C-STORE SCP that validates each instance and stores it durably
before it answers, refusing bad input with a DICOM status and a one-line reason (no patient data
in the log)."""
from __future__ import annotations

import hashlib
import logging
from typing import Any

from hygeia.errors import InputError

log = logging.getLogger("hygeia_pacs.gateway")

# Failure statuses for rejected instances (0xC000-0xCFFF: "Cannot understand", PS3.4 B.2.3).
STATUS_UNDECODABLE = 0xC210  # not a decodable DICOM data set
STATUS_NO_PIXELS = 0xC211  # DICOM without pixel data
STATUS_MODALITY = 0xC212  # modality not accepted
STATUS_VOLUME = 0xC213  # 3D volume (several frames) where a 2D image is expected
STATUS_PIXELS = 0xC214  # pixel data not decodable (transfer syntax / compression)
STATUS_BAD_UID = 0xC215  # missing or malformed Study/SOP Instance UID
STATUS_OUT_OF_RESOURCES = 0xA700  # could not write to the spool



def describe_error(exc: BaseException) -> str:
    """One line about an error for the log, without file names (spool paths hold UIDs)."""
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'I/O error'}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def study_tag(study_uid: str) -> str:
    """A short, non-reversible name for a study in logs (no PHI, no UID)."""
    return "study#" + hashlib.sha256(study_uid.encode()).hexdigest()[:10]


class Listener:
    """The receiving half of :class:`hygeia_pacs.gateway.Gateway` (needs its config, spool, counters)."""

    config: Any
    spool: Any
    _server: Any

    def _count(self, key: str, n: int = 1) -> None:  # pragma: no cover - the Gateway's
        raise NotImplementedError

    def _start_listener(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.config.ae_title)
        ae.require_calling_aet = list(self.config.allowed_callers)
        ae.maximum_pdu_size = 0
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, list(self.config.transfer_syntaxes))
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ABORTED, self._on_aborted)]
        self._ae = ae
        ssl_context = self.config.tls.server_context() if self.config.tls is not None else None
        self._server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers,
                                       ssl_context=ssl_context)
        log.info("gateway %s listening on %s:%d (callers %s); spool %s", self.config.ae_title, self.config.host,
                 self.config.port, ",".join(self.config.allowed_callers), self.config.spool)

    def _reject(self, event: Any, status: int, reason: str) -> Any:
        from pydicom import Dataset

        self._count("rejected")
        caller = getattr(getattr(event.assoc, "requestor", None), "ae_title", "?")
        sop_class = str(getattr(getattr(event, "request", None), "AffectedSOPClassUID", "?"))
        log.warning("rejected instance from %s: %s (SOP Class %s, status 0x%04X)", caller, reason, sop_class, status)
        ds = Dataset()
        ds.Status = status
        ds.ErrorComment = reason[:64]
        return ds

    def _on_rejected(self, event: Any) -> None:
        caller = getattr(getattr(event.assoc, "requestor", None), "ae_title", "?")
        log.warning("association from AE title %r rejected (not in allowed_callers)", caller)

    def _on_aborted(self, event: Any) -> None:
        log.info("association aborted")

    def _on_store(self, event: Any) -> Any:
        """C-STORE handler: validate, store durably, then answer."""
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            _ = [elem for elem in ds]  # force parsing of every top-level element
        except Exception as exc:
            return self._reject(event, STATUS_UNDECODABLE, f"not a decodable DICOM data set ({type(exc).__name__})")
        study_uid, sop_uid = str(getattr(ds, "StudyInstanceUID", "")), str(getattr(ds, "SOPInstanceUID", ""))
        if not study_uid or not sop_uid:
            return self._reject(event, STATUS_BAD_UID, "missing Study Instance UID or SOP Instance UID")
        if "PixelData" not in ds:
            return self._reject(event, STATUS_NO_PIXELS, "no Pixel Data: an image is expected")
        modality = str(getattr(ds, "Modality", "")).upper()
        if modality not in self.config.modalities:
            return self._reject(event, STATUS_MODALITY,
                                f"modality {modality or 'none'} not accepted ({'/'.join(self.config.modalities)})")
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 1:
            return self._reject(event, STATUS_VOLUME, f"3D volume ({frames} frames): 2D image expected")
        from hygeia.data.io import load_dataset

        try:
            load_dataset(ds, name="received instance")
        except InputError as exc:
            return self._reject(event, STATUS_PIXELS, f"pixel data not usable: {exc.got}"[:64])
        try:
            self.spool.store(study_uid, sop_uid, event.encoded_dataset(include_meta=True))
        except ValueError as exc:
            return self._reject(event, STATUS_BAD_UID, str(exc))
        except OSError as exc:
            log.error("cannot write to the spool: %s", describe_error(exc))
            return self._reject(event, STATUS_OUT_OF_RESOURCES, "gateway spool not writable")
        self._count("accepted")
        return 0x0000

