"""Run by tests/test_training_loop.py, alone or under torchrun: fit a small BatchNorm-free network
on a label file and write the weights as safetensors (rank 0).

    python tests/ddp_fit.py LABELS OUT.safetensors            # one process
    torchrun --standalone --nproc-per-node 2 tests/ddp_fit.py LABELS OUT.safetensors
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from hygeia.data.labels import read_labels
from hygeia_lab.training import FitConfig, fit


def small_net(n_out: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, n_out))


def main(labels: str, out: str) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    table = read_labels(labels)
    items = table.rows  # a LabelRow has the fields of an Item
    cfg = FitConfig(size=32, epochs=2, batch_size=8, lr=1e-2, patience=5, workers=0, seed=0, progress=False)
    res = fit(small_net(len(table.findings)), items[:32], items[32:], Path(out).with_suffix(""), cfg)
    if res is not None:
        save_file({k: v.contiguous() for k, v in res.state_dict.items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
