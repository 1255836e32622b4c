"""Hygeia DICOM integration: TID 1500 Structured Reports for diagnoses, synthetic Secondary
Captures and synthetic Digital X-Ray images for generated images. Registered through
``hygeia_output_formats`` (formats ``sr``, ``dicom-sc`` and ``dicom-dx``); DICOM reading itself
lives in the core (:mod:`hygeia.data.io`).
"""
from __future__ import annotations

from typing import Any, Iterator

from hygeia import hookimpl
from hygeia.api import OutputFormat

__all__ = ["build_sc", "build_sr", "dx_dataset", "write_dx", "write_sc", "write_sr"]


def __getattr__(name: str) -> Any:  # lazy: importing highdicom costs ~1 s
    if name in ("build_sr", "write_sr"):
        from . import sr

        return getattr(sr, name)
    if name in ("build_sc", "write_sc"):
        from . import sc

        return getattr(sc, name)
    if name in ("dx_dataset", "write_dx"):
        from . import dx

        return getattr(dx, name)
    raise AttributeError(name)


def _write_sr(results: Any, out: Any, **context: Any) -> list[Any]:
    from .sr import write_sr

    return write_sr(results, out, **context)


def _build_sr(results: Any, **context: Any) -> list[Any]:
    from .sr import build_sr

    return [build_sr(results, context.pop("sources", None) or [], **context)]


def _write_sc(results: Any, out: Any, **context: Any) -> list[Any]:
    from .sc import write_sc

    return write_sc(results, out, **context)


def _write_dx(results: Any, out: Any, **context: Any) -> list[Any]:
    from .dx import write_dx

    return write_dx(results, out, **context)


@hookimpl
def hygeia_output_formats() -> Iterator[OutputFormat]:
    yield OutputFormat(
        name="sr", accepts="diagnosis",
        description="DICOM Comprehensive 3D SR, TID 1500 Measurement Report (one per study, not verified)",
        write=_write_sr, build=_build_sr)
    yield OutputFormat(
        name="dicom-sc", accepts="images",
        description="DICOM Secondary Capture per generated image, marked synthetic (ConversionType SYN)",
        write=_write_sc)
    yield OutputFormat(
        name="dicom-dx", accepts="images",
        description="DICOM Digital X-Ray image (For Presentation) per generated image, marked synthetic",
        write=_write_dx)
