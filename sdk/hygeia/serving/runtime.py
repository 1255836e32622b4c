"""Which runtime serves each diagnoser's network (``hygeia triton build --runtime``), recorded in its config.

``auto`` (the default) measures eager torch, TorchScript and ONNX Runtime on the build machine
(:func:`hygeia.compiled.measure`, batch 1 and 32, one thread as in a CPU stub) and records the
fastest in the config parameters ``hygeia_runtime`` (``onnx``, ``torchscript`` or ``eager``),
``hygeia_runtime_ms`` (the timings, JSON) and ``hygeia_runtime_reason`` (why eager, if so). A
rebuild keeps an earlier measured choice for the same plugin version and weights (no
re-measuring, no config churn); ``--runtime onnx|torchscript|eager`` forces one. The Triton model compiles its
plugin's network with the recorded runtime when it builds the plugin
(:mod:`hygeia.serving.adapter`); ``HYGEIA_RUNTIME`` in the server's environment overrides it.

A plugin that can freeze itself (:mod:`hygeia.frozen`) is frozen into the model's ``1/frozen/``
folder when its runtime is ``auto`` or ``onnx`` on a CPU host (:func:`freeze_params`); the config
parameter ``hygeia_frozen`` names the runner the stub constructs instead of the plugin.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PARAMS = ("hygeia_runtime", "hygeia_runtime_ms", "hygeia_runtime_reason")
CHOICES = ("auto", "onnx", "torchscript", "eager")
FROZEN_PARAM, FROZEN_DIR = "hygeia_frozen", "frozen"


def config_params(config: Path) -> dict[str, str]:
    """The string parameters of a generated ``config.pbtxt`` ({} if unreadable)."""
    try:
        text = config.read_text()
    except OSError:
        return {}
    out = {}
    for m in re.finditer(r'key: "([^"]+)"\n  value: \{ string_value: "((?:[^"\\]|\\.)*)" \}', text):
        out[m.group(1)] = m.group(2).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
    return out


def runtime_params(instance: Any, params: dict[str, str], runtime: str = "auto", device: str = "cpu",
                   previous: dict[str, str] | None = None) -> dict[str, str]:
    """The ``hygeia_runtime*`` parameters of one diagnoser model (``params``: its other parameters)."""
    import torch

    from ..compiled import compile_plugin

    if runtime not in CHOICES:
        raise ValueError(f"unknown runtime {runtime!r}: expected one of {', '.join(CHOICES)}")
    prev = previous or {}
    same = all(prev.get(k) == params.get(k) for k in ("hygeia_version", "hygeia_weights_sha256", "hygeia_info"))
    forced = prev.get("hygeia_runtime_ms", "{}") == "{}"  # forced, or could not compile then: measure again
    if runtime == "auto" and same and prev.get("hygeia_runtime") and not forced:
        return {k: prev.get(k, "") for k in PARAMS}
    if device == "gpu" and runtime in ("auto", "onnx"):
        return {"hygeia_runtime": "eager", "hygeia_runtime_ms": "{}",
                "hygeia_runtime_reason": "onnxruntime here is CPU-only; the network runs eager on the GPU"}
    info = json.loads(params.get("hygeia_info", "{}"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one CPU stub runs with
    try:
        res = compile_plugin(instance, runtime, size=info.get("input_size"), channels=int(info.get("channels", 1)),
                             name=params.get("hygeia_name", ""))
    finally:
        torch.set_num_threads(threads)
    ms = {k: [round(v, 2) for v in vs] for k, vs in res.timings.items()}
    return {"hygeia_runtime": res.runtime, "hygeia_runtime_ms": json.dumps(ms, sort_keys=True, separators=(",", ":")),
            "hygeia_runtime_reason": res.reason}


def freeze_params(instance: Any, model_dir: Path, runtime: str = "auto", device: str = "cpu"
                  ) -> tuple[dict[str, str], Path | None]:
    """``({"hygeia_frozen": runner}, folder)`` for a plugin served frozen: ``folder`` is a fresh
    frozen folder to move into the model, or None to keep ``model_dir/1/frozen`` (frozen earlier
    from the same plugin version and weights). ``({}, None)``: served as the plugin (no
    ``freeze()``, another runtime or device, or a runner that disagrees with the plugin: logged)."""
    from ..frozen import freeze, manifest

    if device != "cpu" or runtime not in ("auto", "onnx") or not callable(getattr(instance, "freeze", None)):
        return {}, None
    ident, current = instance.identity, model_dir / "1" / FROZEN_DIR
    have = manifest(current) or {"identity": {}}
    if (have["identity"].get("name"), have["identity"].get("version"), have["identity"].get("weights_sha256")) == (
            ident.name, ident.version, ident.weights_sha256):
        runner = str(have.get("runner", ""))
        if _importable(runner.partition(":")[0]):  # else: renamed since, freeze again
            return {FROZEN_PARAM: runner}, None
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.frozen.", dir=model_dir.parent))
    try:
        runner = freeze(instance, scratch / FROZEN_DIR)
    except ValueError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        log.warning("%s: served without freezing: %s", model_dir.name, exc)
        return {}, None
    return {FROZEN_PARAM: runner}, scratch / FROZEN_DIR


def frozen_runner(version_dir: str, device: str) -> tuple[Any, str]:
    """``(runner, "")`` from ``version_dir/frozen``, or ``(None, why not)``: ``HYGEIA_FROZEN=0``,
    ``HYGEIA_RUNTIME`` set to another runtime, a GPU instance, no folder, or a runner that cannot be
    loaded (e.g. renamed since the build); the stub then builds the plugin."""
    import os

    from ..errors import BundleError
    from ..frozen import load

    folder, forced = os.path.join(version_dir, FROZEN_DIR), os.environ.get("HYGEIA_RUNTIME", "")
    why = ("HYGEIA_FROZEN=0" if os.environ.get("HYGEIA_FROZEN", "1") == "0" else
           f"HYGEIA_RUNTIME={forced}" if forced not in ("", "onnx") else
           "not on a CPU instance" if device != "cpu" else
           "no frozen folder (run `hygeia triton build`)" if not os.path.isdir(folder) else "")
    if why:
        return None, why
    try:
        return load(folder), ""
    except BundleError as exc:
        return None, str(exc)


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def link_identical(repo: Path) -> int:
    """Hard-link identical files of the repository's frozen folders to one copy; returns the bytes saved.

    Several frozen models hold the same large file: the sentence encoder (``encoder.onnx``, 87 MB)
    is in the ``text`` conditioner's, ``fusion``'s and each image generator's folder. Files of
    equal size and SHA-256 become links to one of them (each model folder stays complete; nothing
    writes them in place: a rebuild replaces a folder as a whole). Only files whose size another
    file shares are read, so a repository linked before costs a directory walk.
    """
    import hashlib
    import os

    by_size: dict[int, dict[int, list[Path]]] = {}  # size -> inode -> its paths
    for f in sorted(repo.glob(f"*/*/{FROZEN_DIR}/**/*")):
        if f.is_file() and not f.is_symlink() and not f.name.endswith(".link") and f.stat().st_size >= 1 << 20:
            by_size.setdefault(f.stat().st_size, {}).setdefault(f.stat().st_ino, []).append(f)
    saved = 0
    for size, inodes in by_size.items():
        if len(inodes) < 2:
            continue
        first: dict[str, Path] = {}
        for paths in inodes.values():
            with paths[0].open("rb") as fh:
                keep = first.setdefault(hashlib.file_digest(fh, "sha256").hexdigest(), paths[0])
            if keep == paths[0]:
                continue
            for path in paths:
                tmp = path.with_name(f".{path.name}.link")
                try:
                    tmp.unlink(missing_ok=True)
                    os.link(keep, tmp)
                    os.replace(tmp, path)
                except OSError as exc:  # another filesystem, no hard links: keep the copy
                    tmp.unlink(missing_ok=True)
                    log.info("frozen file %s kept as a copy (%s)", path, exc)
                    break
            else:
                saved += size
    return saved
