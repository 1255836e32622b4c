"""The ``hygeia`` command line (also ``python -m hygeia``).

Commands and flags here are a contract that users' scripts rely on: keep them stable.
Errors from bad input are printed as one line (``error: ...``) with exit status 2, no traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import HygeiaError, InputError
from .validation import check_seed

app = typer.Typer(
    name="hygeia",
    help="Hygeia: plugin-based clinical imaging SDK (generators, conditioners, diagnosers).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

# Core modules that add their own commands (they live in the sdk, so the core may import them).
_COMMAND_MODULES = ("hygeia.serving.cli",)


def parse_options(options: list[str] | None) -> dict[str, Any]:
    """``--option key=value`` pairs; values are parsed as JSON when possible (numbers, bools)."""
    out: dict[str, Any] = {}
    for item in options or []:
        if "=" not in item:
            raise InputError("--option", "KEY=VALUE", got=repr(item))
        k, v = item.split("=", 1)
        if not k.strip():
            raise InputError("--option", "KEY=VALUE with a key", got=repr(item))
        try:
            out[k.strip()] = json.loads(v)
        except ValueError:
            out[k.strip()] = v
    return out


def _opt(flag: str, help_text: str) -> Any:
    """An optional ``--flag VALUE`` (None when not given)."""
    return typer.Option(None, flag, help=help_text)


def _progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err, transient=True)


# --------------------------------------------------------------------------- plugins
@app.command()
def plugins(json_out: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """List installed plugins: kind, name, version and source package."""
    from .plugins import get_registry

    reg = get_registry()
    specs = reg.all()
    if json_out:
        console.print_json(json.dumps([s.metadata() for s in specs]))
    else:
        t = Table("kind", "name", "version", "package", "description")
        for s in specs:
            t.add_row(s.kind, s.name, s.version, s.package, s.description)
        console.print(t)
    for f in reg.failures:
        err.print(f"[yellow]warning:[/] plugin {f.name!r} ({f.package}) failed to load: {f.error}")


# --------------------------------------------------------------------------- generate
@app.command()
def generate(
    plugin: str = typer.Option(..., "--plugin", "-p", help="Generator plugin name (see `hygeia plugins`)."),
    n: int = typer.Option(16, "-n", help="How many samples."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed: same seed, same output."),
    condition: Optional[str] = typer.Option(None, "--condition", "-c",
                                            help="A finding label, free text, or JSON properties."),
    out: Path = typer.Option(Path("samples.png"), "--out", "-o",
                             help="Images: a file an output format takes (.png: a grid); molecules: .smi or .sdf."),
    dicom: Optional[Path] = typer.Option(None, "--dicom", help="Also write DICOM Secondary Captures here."),
    server: Optional[str] = typer.Option(None, "--server", help="Generate on a Triton server HOST:PORT."),
    option: Optional[list[str]] = typer.Option(None, "--option", help="Plugin option KEY=VALUE (repeatable)."),
) -> None:
    """Generate synthetic images (a PNG grid, or any output format by suffix) or molecules (.smi/.sdf)."""
    cond: Any = condition
    if condition and condition.lstrip().startswith("{"):
        try:
            cond = json.loads(condition)
        except ValueError as exc:
            raise InputError("--condition", "valid JSON for property targets", got=str(exc)) from None
    gen = _plugin("generator", plugin, server)
    opts = parse_options(option)
    with _progress() as prog:
        task = prog.add_task(f"generating with {plugin}", total=n)
        if _accepts_progress(gen.generate):
            opts["progress"] = lambda done, total: prog.update(task, completed=done, total=total)
        results = gen.generate(n, condition=cond, seed=seed, **opts)
    if gen.output == "molecule":
        smiles = [m.smiles for m in results]
        from .chem import write_molecules

        write_molecules(smiles, out)
        valid = sum(m.valid for m in results)
        console.print(f"wrote {len(results)} molecules ({valid} valid) to {out}")
        return
    from .plugins import get_registry

    get_registry().output_format_for(out, "images").write(results, out)
    console.print(f"wrote {len(results)} synthetic images to {out}")
    if dicom is not None:
        paths = get_registry().output_format("dicom-sc").write(results, dicom, sources=None)
        console.print(f"wrote {len(paths)} DICOM Secondary Captures (synthetic) to {dicom}")


# --------------------------------------------------------------------------- diagnose
@app.command()
def diagnose(
    inputs: list[Path] = typer.Argument(..., help="DICOM (.dcm), PNG or .npy/.npz images.", exists=True,
                                        dir_okay=False),
    plugin: Optional[str] = typer.Option(None, "--plugin", "-p",
                                         help="Diagnoser plugin name (default: $HYGEIA_DIAGNOSER or the installed default)."),
    text: Optional[list[str]] = typer.Option(None, "--text", "-t",
                                             help="Clinical history/indication (one, or one per image)."),
    json_out: bool = typer.Option(False, "--json", help="Print findings as JSON."),
    sr: Optional[Path] = typer.Option(None, "--sr", help="Write a DICOM TID 1500 Structured Report (DICOM input)."),
    png: Optional[Path] = typer.Option(None, "--png", help="Write heat-map overlays as PNG (first image)."),
    server: Optional[str] = typer.Option(None, "--server", help="Diagnose on a Triton server HOST:PORT."),
    bundle: Optional[Path] = _opt("--bundle", "A bundle folder to load instead of the plugin's shipped weights "
                                  "(e.g. one `hygeia train --data` wrote)."),
) -> None:
    """Diagnose images: findings with probabilities, thresholds, regions."""
    import numpy as np

    from .data.io import load_image, prepare_image

    if plugin is None:
        from .plugins import get_registry

        plugin = get_registry().default_name("diagnoser")
    diag = _plugin("diagnoser", plugin, server, bundle)
    loaded = [load_image(p) for p in inputs]
    batch = np.stack([prepare_image(li.pixels, size=diag.input_size) for li in loaded])
    texts = None
    if text:
        texts = list(text) * len(inputs) if len(text) == 1 else list(text)
    from .api import regions_options

    # the table, JSON and SR need the regions only; --png draws the heat maps (the model's default)
    results = diag.diagnose(batch, texts=texts, **({} if png is not None else regions_options(diag)))
    if json_out:
        console.print_json(json.dumps([{"input": str(p), **d.to_dict()} for p, d in zip(inputs, results)]))
    else:
        for p, d in zip(inputs, results):
            t = Table("finding", "SNOMED CT", "probability", "threshold", "present", "region",
                      title=f"{p} - {d.model.name} {d.model.version}")
            for f in d.findings:
                region = "" if f.region is None else f"{f.region.kind} @ ({f.region.center()[0]:.0f}, {f.region.center()[1]:.0f})"
                t.add_row(f.label, f.code.value, f"{f.probability:.3f}", f"{f.threshold:.3f}",
                          "[bold red]yes[/]" if f.present else "no", region)
            console.print(t)
    if png is not None:
        from .outputs import write_diagnosis_png

        write_diagnosis_png(png, batch[0, 0], results[0])
        err.print(f"wrote {png}")
    if sr is not None:
        from .plugins import get_registry

        sources = [li.dataset if li.dataset is not None else li.path for li in loaded]
        get_registry().output_format("sr").write(results, sr, sources=sources)
        err.print(f"wrote DICOM SR {sr}")


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters


def _accepts_progress(fn: Any) -> bool:
    return _accepts(fn, "progress")


def _plugin(kind: Any, name: str, server: Optional[str], bundle: Optional[Path] = None) -> Any:
    if server:
        if bundle is not None:
            raise InputError("--bundle", "no --server (the server loads its own bundles)", got="both given")
        from .serving import connect

        return connect(kind, name, server)
    from .plugins import get_registry

    return get_registry().create_from_bundle(kind, name, bundle)


# --------------------------------------------------------------------------- train
@app.command()
def train(
    plugin: str = typer.Argument(..., help="Plugin to train (must declare a trainer)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Bundle folder (default: the plugin's default)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed: the same seed reproduces the same weights."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: the plugin's)."),
    resume: bool = typer.Option(False, "--resume", help="Resume from the last checkpoint, if the plugin supports it."),
    data: Optional[Path] = _opt("--data", "Your labelled studies: a CheXpert-style or ChestX-ray14-style CSV, or a "
                                "MONAI datalist JSON (docs/user-data.md)."),
    image_root: Optional[Path] = _opt("--image-root", "Folder the image paths are relative to (default: the "
                                      "label file's folder)."),
    codes: Optional[Path] = _opt("--codes", "CSV finding,code,scheme,meaning for findings outside the built-in table."),
    uncertain: Optional[str] = _opt("--uncertain", "CheXpert -1 labels: ignore (default), u-ones or u-zeros."),
    text_column: Optional[str] = _opt("--text-column", "Column with clinical text, for diagnosers that read text."),
    init: Optional[Path] = _opt("--init", "Fine-tune from this bundle instead of training from scratch."),
    nproc: int = typer.Option(1, "--nproc", help="Processes on this machine (torch DDP through torchrun; gloo on "
                              "CPU, NCCL on GPU)."),
    option: Optional[list[str]] = typer.Option(None, "--option", help="Trainer option KEY=VALUE (repeatable)."),
) -> None:
    """Train a plugin's model reproducibly and write its bundle (on phantoms, or on --data)."""
    from .plugins import get_registry

    spec = get_registry().find(plugin)
    if spec.train is None:
        raise InputError("plugin", f"a plugin with a trainer ({spec.kind} {plugin!r} has none)")
    check_seed(seed, "--seed")
    if nproc != 1:
        _torchrun(nproc)
    opts = parse_options(option)
    given = {"out": out, "epochs": epochs, "data": data, "image_root": image_root, "codes": codes,
             "uncertain": uncertain, "text_column": text_column, "init": init}
    opts.update({k: v for k, v in given.items() if v is not None})
    if resume:
        opts["resume"] = True
    trainer = spec.trainer()
    _check_trainer_options(trainer, opts)
    path = trainer(seed=seed, progress=True, **opts)  # type: ignore[misc]
    if path is not None:  # None: a DDP rank other than 0
        console.print(f"trained {spec.kind} {plugin!r}; bundle at {path}")


def _check_trainer_options(trainer: Any, opts: dict[str, Any]) -> None:
    """Options the trainer names as keyword arguments must have their default's kind (a number, ...)."""
    import inspect

    from .validation import check_option_values

    params = inspect.signature(trainer).parameters.values()
    check_option_values(opts, {p.name: p.default for p in params if p.default is not inspect.Parameter.empty})


def _torchrun(nproc: int) -> None:
    """Run this same ``hygeia train`` command as ``nproc`` processes under torchrun, then exit.

    Several machines: run ``torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT -m hygeia
    train ...`` on each (docs/user-data.md); the trainer reads the torchrun environment.
    """
    import os
    import subprocess

    if isinstance(nproc, bool) or not 1 <= nproc <= 64:
        raise InputError("--nproc", "an integer from 1 to 64", got=nproc)
    if os.environ.get("LOCAL_RANK") is not None:  # already a torchrun worker
        return
    argv = list(sys.argv[1:])
    for i, a in enumerate(argv):
        if a == "--nproc":
            del argv[i:i + 2]
            break
        if a.startswith("--nproc="):
            del argv[i]
            break
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "hygeia", *argv]
    raise typer.Exit(subprocess.call(cmd))


_loaded = False


def get_app() -> typer.Typer:
    """The ``hygeia`` app with every command: the core's, serving's and those plugins add
    through ``hygeia_cli_commands`` (the lab's ``evaluate`` and ``demo``, the gateway's ...)."""
    global _loaded
    if not _loaded:
        _loaded = True
        _load_command_plugins()
    return app


def _load_command_plugins() -> None:
    import importlib

    for mod in _COMMAND_MODULES:
        try:
            importlib.import_module(mod).register(app)
        except ImportError as exc:  # optional extra not installed
            err.print(f"[yellow]warning:[/] commands from {mod} unavailable: {exc}")
    from .plugins import get_registry

    get_registry().pm.hook.hygeia_cli_commands(app=app)


def _usage_errors() -> tuple[type[BaseException], ...]:
    """The exceptions typer raises for bad usage (its vendored click's, and click's own)."""
    found: list[type[BaseException]] = []
    if hasattr(typer, "TyperException"):
        found.append(typer.TyperException)
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(found)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI; a usage error, HygeiaError or refused path -> one line on stderr, exit 2."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        rc = get_app()(args=argv, standalone_mode=False)
    except _usage_errors() as exc:  # unknown option, missing argument, a path that does not exist
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare command group: its help, as typer shows it
            try:
                get_app()(args=[*(sys.argv[1:] if argv is None else argv), "--help"], standalone_mode=True)
            except SystemExit:
                pass
            sys.exit(2)
        ctx = getattr(exc, "ctx", None)
        see = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        err.print(f"error: {exc.format_message()}{see}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Abort:  # Ctrl-C at a prompt
        err.print("aborted", markup=False)
        sys.exit(130)
    except HygeiaError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:  # a file or folder the OS refuses (read-only, not a folder, no space): its reason
        path = exc.filename2 if exc.filename2 is not None else exc.filename
        where = f"{path}: " if path is not None else ""
        why = "a file where a folder is needed" if isinstance(exc, (FileExistsError, NotADirectoryError)) else None
        err.print(f"error: {where}{why or exc.strerror or exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    if isinstance(rc, int) and rc:
        sys.exit(rc)
