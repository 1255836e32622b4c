"""The main job, end to end: a phantom study is written as DICOM, diagnosed, and the findings
written as JSON, PNG overlays and (when the DICOM integration is installed) a TID 1500 SR per
image; a few synthetic images are generated and written as a PNG grid (and Secondary Captures)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table


def run_demo(out: Path, seed: int = 0, server: str | None = None, local: bool = False,
             console: Console | None = None, plugin: str | None = None, n_images: int = 4) -> dict[str, Any]:
    """Run the demo into ``out``; returns a summary (also written as ``out/findings.json``)."""
    from .studies import write_phantom_study
    from hygeia.data.io import load_image, prepare_image
    from hygeia.errors import PluginNotFoundError
    from hygeia.outputs import write_diagnosis_png, write_json

    from .grids import write_image_grid
    from hygeia.plugins import get_registry

    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    reg = get_registry()
    plugin = plugin or reg.default_name("diagnoser")
    files = write_phantom_study(out / "study", n=n_images, seed=seed, size=256)  # clinical size; resized per diagnoser
    console.print(f"1. wrote a phantom study of {len(files)} DICOM images to {out / 'study'}")

    loaded = [load_image(f) for f in files]
    if local or server:
        diagnoser = reg.create("diagnoser", plugin) if local else _remote(plugin, server)
        results = diagnoser.diagnose(np.stack([prepare_image(li.pixels, size=diagnoser.input_size) for li in loaded]))
        where = "in-process" if local else f"Triton at {server}"
    else:
        from hygeia.serving.launch import serve_plugins

        console.print("   starting the embedded Triton Inference Server ...")
        with serve_plugins([plugin]) as srv:
            diagnoser = _remote(plugin, srv.grpc_url)
            results = diagnoser.diagnose(np.stack([prepare_image(li.pixels, size=diagnoser.input_size) for li in loaded]))
            where = f"Triton Inference Server (embedded) at {srv.grpc_url}"
    console.print(f"2. diagnosed {len(results)} images with {plugin!r} via {where}")

    summary: dict[str, Any] = {"diagnoser": plugin, "via": where, "images": []}
    t = Table("image", "present findings (probability)", title="Findings")
    for f, li, d in zip(files, loaded, results):
        png = out / f"{f.stem}_findings.png"
        write_diagnosis_png(png, prepare_image(li.pixels, size=d.image_size)[0], d)
        entry: dict[str, Any] = {"file": str(f), "png": str(png), **d.to_dict()}
        summary["images"].append(entry)
        t.add_row(f.name, ", ".join(f"{x.label} ({x.probability:.2f})" for x in d.present()) or "none")
    console.print(t)

    try:
        sr_writer = reg.output_format("sr")
    except PluginNotFoundError:
        sr_writer = None
    if sr_writer is not None:
        for entry, li, d in zip(summary["images"], loaded, results):
            sr_path = out / f"{Path(entry['file']).stem}_sr.dcm"
            sr_writer.write([d], sr_path, sources=[li.dataset])
            entry["sr"] = str(sr_path)
        console.print(f"3. wrote {len(results)} DICOM TID 1500 Structured Reports to {out}")

    gen = reg.create("generator", "phantom")
    samples = gen.generate(4, condition="effusion", seed=seed)
    grid = write_image_grid(out / "synthetic_effusion.png", samples)
    summary["synthetic_png"] = str(grid)
    try:
        sc_paths = reg.output_format("dicom-sc").write(samples, out / "synthetic_sc", sources=None)
        summary["synthetic_sc"] = [str(p) for p in sc_paths]
    except PluginNotFoundError:
        pass
    console.print(f"4. generated 4 synthetic images (marked SYNTHETIC) to {grid}")
    write_json(out / "findings.json", summary)
    console.print(f"findings: {out / 'findings.json'}")
    return summary


def _remote(plugin: str, server: str | None) -> Any:
    from hygeia.serving import connect

    return connect("diagnoser", plugin, server)
