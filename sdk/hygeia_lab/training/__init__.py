"""Supervised training of diagnosers on labelled image files (the user's studies or exported phantoms).

A plugin's trainer builds its network and hands it to :func:`fit` with the training and
validation :class:`Item` lists (split by patient with :func:`patient_split`); the result holds the
best weights, thresholds chosen on validation and the per-epoch history, which
:func:`metrics_csv` and :func:`curve_png` turn into files for the bundle. See docs/user-data.md.
"""
from __future__ import annotations

from .data import Item, ShardedPermutation, patient_split, pos_weight, split_label_file
from .loop import FitConfig, FitResult, auroc_per_finding, fit, init_distributed, leave_distributed, youden_thresholds
from .report import codes_config, curve_png, export_command, metrics_csv, phantom_export

__all__ = ["FitConfig", "FitResult", "Item", "ShardedPermutation", "auroc_per_finding", "curve_png", "fit",
           "init_distributed", "leave_distributed", "metrics_csv", "patient_split", "pos_weight", "youden_thresholds", "codes_config",
           "phantom_export", "export_command", "split_label_file"]
