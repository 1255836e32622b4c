"""What a training run leaves in its bundle besides the weights: ``metrics.csv``, a curve PNG, the
findings' codes and, for an exported phantom set, the settings that reproduce it."""
from __future__ import annotations

import csv
import io
from typing import Any, Sequence


def metrics_csv(history: Sequence[dict[str, Any]], findings: Sequence[str]) -> bytes:
    """One row per epoch: loss, validation macro AUROC, per-finding AUROC (named), images/s."""
    rows = [{(f"val_auroc_{findings[int(k.rsplit('_', 1)[1])]}" if k.startswith("val_auroc_")
              and k.rsplit("_", 1)[1].isdigit() else k): v for k, v in h.items()} for h in history]
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue().encode()


def curve_png(history: Sequence[dict[str, Any]], title: str = "training") -> bytes:
    """Training loss and validation macro AUROC per epoch, as PNG bytes (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_macro_auroc"] for h in history], "s-", color="tab:red", label="val macro AUROC")
    ax2.set_ylabel("validation macro AUROC", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def codes_config(table: Any) -> dict[str, dict[str, str]]:
    """A label table's findings and codes as a bundle config's ``codes`` (:func:`hygeia.vocab.bundle_codes`)."""
    return {f: {"value": c.value, "scheme": c.scheme, "meaning": c.meaning} for f, c in zip(table.findings, table.codes())}


def phantom_export(table: Any) -> dict[str, Any] | None:
    """The settings of a phantom export (``phantoms.json`` beside the label file), or None."""
    import json

    p = table.source.parent / "phantoms.json" if table.source is not None else None
    try:
        doc = json.loads(p.read_text()) if p is not None and p.is_file() else None
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("synthetic") else None


def export_command(phantoms: dict[str, Any]) -> str:
    """The ``hygeia phantoms export`` command that rewrites an export (``phantoms.json`` settings) into DIR."""
    text = " --text" if phantoms.get("text") else ""
    return (f"hygeia phantoms export --layout {phantoms.get('layout')} -n {phantoms.get('n')} --size {phantoms.get('size')} "
            f"--format {phantoms.get('format')} --split {phantoms.get('split')} --seed {phantoms.get('seed')} "
            f"--difficulty {phantoms.get('difficulty')}{text} --out DIR")
