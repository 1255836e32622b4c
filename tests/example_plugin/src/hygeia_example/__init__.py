"""hygeia-example-plugin: a third-party diagnoser, ``example-intensity``.

Six regional mean intensities (upper/lower lung zones on each side, heart, costophrenic
angles) feed a logistic regression per finding (effusion, cardiomegaly). Small, honest, and
trained on Hygeia phantoms with ``hygeia train example-intensity``.
"""
from __future__ import annotations

import hygeia


@hygeia.hookimpl
def hygeia_diagnosers():  # type: ignore[no-untyped-def]
    from .plugin import SPEC

    yield SPEC
