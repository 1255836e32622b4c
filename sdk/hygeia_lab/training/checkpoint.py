"""Training checkpoints in safetensors (never pickle): the model, the optimizer and the history.

A checkpoint lives in ``<bundle>.train/`` beside the bundle folder, so the bundle itself is only
ever written whole (atomically) at the end; ``--resume`` continues from the last checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hygeia.errors import BundleError
from hygeia.outputs import atomic_dir

MODEL, OPTIM, BEST, STATE = "model.safetensors", "optimizer.safetensors", "best.safetensors", "state.json"


def work_dir(out: Path) -> Path:
    """Where the checkpoints of the bundle ``out`` go."""
    return out.with_name(out.name + ".train")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
         best: dict[str, torch.Tensor]) -> Path:
    """Write a checkpoint (atomically: the previous one stays until the new one is complete);
    ``best``: the weights of the best epoch so far."""
    from safetensors.torch import save_file

    d = work_dir(out)
    with atomic_dir(d) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL))
        tensors, meta = _flatten_optimizer(opt)
        save_file(tensors, str(tmp / OPTIM))
        save_file({k: v.detach().cpu().contiguous() for k, v in best.items()}, str(tmp / BEST))
        (tmp / STATE).write_text(json.dumps({**state, "optimizer": meta}, indent=1))
    return d


def load(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer
         ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore the model and optimizer from the checkpoint of ``out``; returns the saved state and
    the best weights so far."""
    from safetensors.torch import load_file

    d = work_dir(out)
    if not (d / STATE).is_file():
        raise BundleError(f"--resume: no checkpoint in {d} (start without --resume)")
    model.load_state_dict(load_file(str(d / MODEL)))
    state = json.loads((d / STATE).read_text())
    opt.load_state_dict(_unflatten_optimizer(load_file(str(d / OPTIM)), state.pop("optimizer")))
    return state, load_file(str(d / BEST))
