"""The lab's commands on the ``hygeia`` command line: ``evaluate``, ``demo`` and ``phantoms export``.

Added through the ``hygeia_cli_commands`` hook (see :mod:`hygeia_lab.plugin`), so the core's CLI
frame never imports the lab.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

evaluate_app = typer.Typer(help="Evaluate a plugin on held-out phantoms or MOSES.", no_args_is_help=True)


@evaluate_app.command("diagnoser")
def evaluate_diagnoser(
    name: str = typer.Argument(..., help="Diagnoser plugin name."),
    n: int = typer.Option(2000, "-n", help="Held-out phantoms."),
    json_out: bool = typer.Option(False, "--json"),
    roc: Optional[Path] = typer.Option(None, "--roc", help="Write ROC curves as PNG."),
    size: Optional[int] = typer.Option(None, "--size", min=8, help="Phantom size in pixels (default: the diagnoser's input size)."),
    baseline: Optional[str] = typer.Option(
        None, "--baseline", help="Image-only diagnoser a text-aware one is compared with (default: the default diagnoser)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Bundle folder to evaluate (e.g. from `hygeia train --data`)."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Your labelled studies (CheXpert/ChestX-ray14 CSV or MONAI datalist) instead of phantoms."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder the image paths are relative to."),
    codes: Optional[Path] = typer.Option(None, "--codes", help="CSV finding,code,scheme,meaning for your findings."),
    uncertain: Optional[str] = typer.Option(None, "--uncertain", help="CheXpert -1 labels: ignore, u-ones or u-zeros."),
    boxes: Optional[Path] = typer.Option(
        None, "--boxes", help="CSV of boxes (Image Index,Finding Label,x,y,w,h, or NIH's BBox_List): region hit rates."),
    text_column: Optional[str] = typer.Option(
        None, "--text-column", help="Column (datalist: key) with clinical text, for diagnosers that read text."),
) -> None:
    """Per-finding and macro AUROC with bootstrap 95 % intervals, sensitivity/specificity (on phantoms:
    also ECE and localisation), on held-out phantoms or on your labelled studies (--data)."""
    if data is not None:
        from .evaluation.user_data import main_files

        main_files(name, data, bundle=bundle, image_root=image_root, codes=codes, uncertain=uncertain,
                   json_out=json_out, roc=roc, boxes=boxes, text_column=text_column)
        return
    from .evaluation.run import main as run

    if baseline:  # named by the user: a typo fails now, not after the evaluation
        from hygeia.plugins import get_registry

        get_registry().find(baseline)
    run(name, n=n, json_out=json_out, roc=roc, size=size, baseline="" if baseline is None else baseline,
        bundle=bundle)


@evaluate_app.command("generator")
def evaluate_generator(
    name: str = typer.Argument(..., help="Image generator plugin name."),
    n: int = typer.Option(200, "-n", help="Samples per condition."),
    json_out: bool = typer.Option(False, "--json"),
    grid: Optional[Path] = typer.Option(None, "--grid", help="PNG grid of samples per condition."),
    condition_kind: Optional[str] = typer.Option(
        None, "--condition-kind", help="label, text (the TEXT_PROMPTS) or none (default: label when taken)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the samples and of the real phantoms' subsets."),
    option: Optional[list[str]] = typer.Option(
        None, "--option", help="Generate option KEY=VALUE for every sample (repeatable), e.g. guidance_scale=1."),
    judge: Optional[str] = typer.Option(
        None, "--judge", help="Image-only diagnoser that judges the samples (default: the default diagnoser)."),
) -> None:
    """Conditional accuracy (judged by an image-only diagnoser), Frechet distance, KID and MS-SSIM diversity."""
    from hygeia.cli import parse_options

    from .evaluation.generators import main as run

    run(name, n=n, json_out=json_out, grid=grid, condition_kind=condition_kind, seed=seed,
        options=parse_options(option), judge_name=judge)


@evaluate_app.command("molecules")
def evaluate_molecules(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="A .smi file, one SMILES per line."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """The MOSES metric table for a SMILES file, next to the published baselines."""
    from .evaluation.molecules import main as run

    run(path, json_out=json_out)


def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", "-o", help="Output folder."),
    seed: int = typer.Option(0, "--seed", min=0),
    server: Optional[str] = typer.Option(None, "--server", help="Diagnose through this Triton server."),
    local: bool = typer.Option(False, "--local", help="Diagnose in-process instead of through Triton."),
    plugin: Optional[str] = typer.Option(
        None, "--plugin", "-p", help="Diagnoser plugin (default: $HYGEIA_DIAGNOSER or the installed default)."),
) -> None:
    """The main job: a phantom study -> diagnosis -> findings JSON, PNG (and SR, SC where installed)."""
    from hygeia.cli import console

    from .demo import run_demo

    if local and server:
        from hygeia.errors import InputError

        raise InputError("--local/--server", "one of them (in process, or through that server)", got="both")
    run_demo(out, seed=seed, server=server, local=local, console=console, plugin=plugin)


phantoms_app = typer.Typer(help="Phantom datasets on disk, shaped like your labelled studies.", no_args_is_help=True)


@phantoms_app.command("export")
def phantoms_export(
    layout: str = typer.Option(..., "--layout", help="Label file layout: chexpert, nih or datalist."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (new or empty; see --overwrite)."),
    n: int = typer.Option(100, "-n", help="Images (one per patient)."),
    size: int = typer.Option(256, "--size", help="Image size in pixels."),
    image_format: str = typer.Option("dicom", "--format", help="dicom (DX) or png (16-bit)."),
    transfer_syntax: str = typer.Option(
        "explicit", "--transfer-syntax",
        help="DICOM transfer syntax: explicit, deflate, rle, jpegls, jpegls-near, jpeg2000, jpeg2000-lossy, "
             "jpeg-lossless."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed: the same seed and split write the same dataset."),
    split: str = typer.Option("train", "--split", help="train, val or test (never the same phantoms)."),
    text: bool = typer.Option(False, "--text", help="Add the clinical indication as the column 'Indication'."),
    difficulty: Optional[float] = typer.Option(
        None, "--difficulty", help="Phantom difficulty, 0-3 (default 2.0: subtle at 256 px; higher: fainter findings, more noise)."),
    mimics: float = typer.Option(
        0.0, "--mimics", help="Look-alikes of absent findings (skin fold, nipple shadow...), 0-1 (default 0: none)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it holds files."),
) -> None:
    """Write labelled phantoms as a CheXpert-style CSV, a ChestX-ray14-style CSV or a MONAI datalist."""
    from hygeia.cli import console

    from .export import export_phantoms

    label_file = export_phantoms(out, layout=layout, n=n, size=size, image_format=image_format,
                                 transfer_syntax=transfer_syntax, seed=seed, split=split, text=text,
                                 difficulty=difficulty, overwrite=overwrite, progress=True, mimics=mimics)
    console.print(f"wrote {n} phantoms ({layout}, {image_format}) to {out}; labels in {label_file}")


def register(app: typer.Typer) -> None:
    """Add ``hygeia evaluate ...``, ``hygeia demo`` and ``hygeia phantoms export`` to ``app``."""
    app.add_typer(evaluate_app, name="evaluate")
    app.command("demo")(demo)
    app.add_typer(phantoms_app, name="phantoms")
