"""A tiny fusion network on 64 px phantoms, shared by the fusion tests: the trainer's tests need
its behaviour, not the shipped scale."""
from __future__ import annotations

TINY = dict(size=64, blocks=[1, 1, 1, 1], stem=3, mean=0.0, std=1.0, grid=8, shift=3, difficulty=1.0, baselines=False)
"""Trainer options of the tiny network (add ``widths``, ``width``, ``heads`` and the data sizes)."""
