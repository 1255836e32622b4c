"""Training checkpoints of the ``gan`` trainer (used by :mod:`hygeia_gan.train` only): everything
needed to continue a run (both networks, the EMA generator, both Adam states, the numpy and torch
random states), as a bundle (safetensors + JSON; no pickle)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hygeia.bundles import load_bundle, save_bundle
from hygeia.errors import InputError

from .plugin import CARD

HYPER = ("conditioners", "z_dim", "embed_dim", "g_ch", "d_ch", "seed", "batch_size", "lr", "p_null", "ema",
         "n_per_condition", "phantom_difficulty", "init_weights_sha256", "aux_weight", "classifier_steps", "mode_seeking",
         "upsampling")
"""Options a resumed run must share with the checkpointed one."""


def save_checkpoint(path: str | Path, config: dict[str, Any], nets: dict[str, Any], opt_g: Any, opt_d: Any,
                    rng: np.random.Generator, gen: torch.Generator) -> None:
    """Everything needed to continue training, as a bundle (safetensors + JSON; no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, Any] = {}
    for name, module in nets.items():
        tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    for prefix, opt in (("opt_g", opt_g), ("opt_d", opt_d)):
        sd = opt.state_dict()
        groups[prefix] = sd["param_groups"]
        for idx, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"{prefix}.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = gen.get_state()
    state = {"config": config, "param_groups": groups, "numpy_rng": rng.bit_generator.state}
    save_bundle(path, tensors, state, CARD)


def load_checkpoint(path: str | Path, config: dict[str, Any], nets: dict[str, Any], opt_g: Any, opt_d: Any,
                    rng: np.random.Generator, gen: torch.Generator) -> tuple[int, int]:
    """Restore a checkpoint into the networks, optimisers and random streams; ``config`` gets its
    epoch and iteration counts and last losses. Returns ``(epochs, iterations)`` done. InputError
    when the checkpointed run had other options (:data:`HYPER`)."""
    b = load_bundle(path)
    saved = b.config["config"]
    diff = [k for k in HYPER if saved.get(k) != config.get(k)]
    if diff:
        raise InputError("resume", f"the options of the checkpointed run ({', '.join(f'{k}={saved.get(k)!r}' for k in diff)})",
                         got=", ".join(f"{k}={config.get(k)!r}" for k in diff))
    for name, module in nets.items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in b.tensors.items() if k.startswith(name + ".")})
    for prefix, opt in (("opt_g", opt_g), ("opt_d", opt_d)):
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in b.tensors.items():
            if k.startswith(prefix + "."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": b.config["param_groups"][prefix]})
    gen.set_state(b.tensors["rng.torch"])
    rng.bit_generator.state = b.config["numpy_rng"]
    config.update({k: saved[k] for k in ("epochs", "iterations", "last_loss_d", "last_loss_g") if k in saved})
    return int(saved["epochs"]), int(saved["iterations"])
