"""Building the gateway's reports: one TID 1500 SR per study through the ``sr`` output format.

SR UIDs are derived from the study (its Study and SOP Instance UIDs) and the model that read it,
so a study processed twice (a crash before its acknowledgement, a redelivery by the broker)
yields the same SR, which the destination PACS stores once.
"""
from __future__ import annotations

import io
from typing import Any

from hygeia.errors import InputError

SR_FORMAT = "sr"
"""The output format (``hygeia_output_formats``) that builds the reports the gateway sends."""


def encode_sr(diagnoses: list[Any], datasets: list[Any], **uids: str) -> tuple[bytes, dict[str, Any]]:
    """Build one TID 1500 SR through the ``sr`` output format and encode it as a PS3.10 file.

    Returns the bytes and the SR's SOP Instance UID, Series Instance UID, number of finding
    groups and the seconds it took (``build_s``). Runs in a thread or, with ``sr_processes``, in a
    separate process (the arguments are pickled: diagnoses and pixel-free headers).
    """
    import time

    import pydicom

    from hygeia.plugins import get_registry

    t0 = time.perf_counter()
    fmt = get_registry().output_format(SR_FORMAT)
    if fmt.build is None:
        raise InputError(f"output format {SR_FORMAT!r} ({fmt.package})", "a format that builds reports in memory",
                         got="a file writer only")
    sr, = fmt.build(diagnoses, sources=datasets, **uids)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, sr, enforce_file_format=True)
    return buf.getvalue(), {"sop_instance_uid": str(sr.SOPInstanceUID),
                            "series_instance_uid": str(sr.SeriesInstanceUID), "groups": _count_groups(sr),
                            "build_s": time.perf_counter() - t0}


def _warm_sr_process() -> None:
    """Process-pool initializer: import the SR stack once, before the first study."""
    import highdicom  # noqa: F401

    from hygeia.plugins import get_registry

    get_registry().output_format(SR_FORMAT)


def report_uids(datasets: list[Any], model: Any) -> dict[str, str]:
    """Series and SOP Instance UIDs of the study's SR, the same every time for the same study and model."""
    from pydicom.uid import generate_uid

    sops = sorted(str(getattr(d, "SOPInstanceUID", "")) for d in datasets)
    base = ["hygeia-sr", str(getattr(datasets[0], "StudyInstanceUID", "")), *sops,
            str(getattr(model, "name", "")), str(getattr(model, "version", "")), str(getattr(model, "weights_sha256", ""))]
    return {"series_instance_uid": str(generate_uid(entropy_srcs=[*base, "series"])),
            "sop_instance_uid": str(generate_uid(entropy_srcs=[*base, "instance"]))}


def _count_groups(sr: Any) -> int:
    try:
        return sum(1 for _ in sr.ContentSequence[-1].ContentSequence)
    except Exception:
        return 0
