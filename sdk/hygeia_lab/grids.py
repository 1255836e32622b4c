"""Image grids: generated images tiled into one PNG, marked synthetic (the ``png-grid`` output format).

``write_image_grid`` is what ``hygeia generate -o grid.png`` writes; ``write_grid`` is the
labelled grid of per-condition samples that evaluation and training write.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hygeia.api import GeneratedImage
from hygeia.errors import InputError
from hygeia.outputs import SYNTHETIC_NOTE, atomic_path, to_uint8, write_png


def image_grid(images: Sequence[np.ndarray], ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``[H, W]`` or ``[C, H, W]`` float images in [0, 1] into one ``[rows, cols]`` (or RGB) array."""
    arrs = [np.asarray(i, np.float32) for i in images]
    arrs = [a[0] if a.ndim == 3 and a.shape[0] == 1 else (a.transpose(1, 2, 0) if a.ndim == 3 else a) for a in arrs]
    h, w = arrs[0].shape[:2]
    ncols = ncols or int(np.ceil(np.sqrt(len(arrs))))
    nrows = int(np.ceil(len(arrs) / ncols))
    shape = (nrows * (h + pad) + pad, ncols * (w + pad) + pad) + arrs[0].shape[2:]
    grid = np.ones(shape, np.float32)
    for k, a in enumerate(arrs):
        r, c = divmod(k, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = a
    return grid


def write_image_grid(path: str | os.PathLike[str], images: Sequence[GeneratedImage], ncols: int | None = None,
                     **_: Any) -> Path:
    """PNG grid of generated images, marked synthetic twice: a burned-in banner strip under the
    grid (no pixel of any image is touched) and PNG metadata naming the generator, seed, condition."""
    from PIL import Image, ImageDraw

    grid = image_grid([g.pixels for g in images], ncols)
    banner_h = 12
    canvas = Image.fromarray(to_uint8(grid)).convert("L")
    out = Image.new("L", (canvas.width, canvas.height + banner_h), 0)
    out.paste(canvas, (0, 0))
    ImageDraw.Draw(out).text((2, canvas.height), "SYNTHETIC", fill=255)
    first = images[0]
    meta = {
        "Description": SYNTHETIC_NOTE,
        "Synthetic": "true",
        "Software": f"hygeia {first.model.name} {first.model.version}",
        "Generator": json.dumps({"name": first.model.name, "version": first.model.version,
                                 "weights_sha256": first.model.weights_sha256}),
        "Seeds": json.dumps([g.seed for g in images]),
        "Conditions": json.dumps([str(g.condition) for g in images]),
    }
    return write_png(path, np.asarray(out, np.float32) / 255.0, meta)


def write_grid(images: Any, path: str | os.PathLike[str], ncol: int = 8, row_labels: Sequence[str] | None = None,
               scale: int = 2, pad: int = 2) -> Path:
    """Write ``images`` (``[N, 1, H, W]`` or ``[N, H, W]`` in [0, 1]) as one PNG grid, atomically.

    ``row_labels`` are drawn at the left of each row (one per row of ``ncol`` images).
    """
    from PIL import Image, ImageDraw

    a = np.asarray(images, dtype=np.float32)
    if a.ndim == 4:
        a = a[:, 0]
    if a.ndim != 3 or len(a) == 0:
        raise InputError("images", "a non-empty [N, 1, H, W] or [N, H, W] array", got=f"shape {list(a.shape)}")
    n, h, w = a.shape
    nrow = -(-n // ncol)
    left = 0 if not row_labels else 8 + 7 * max(len(s) for s in row_labels)
    canvas = np.full((nrow * (h * scale + pad) + pad, left + ncol * (w * scale + pad) + pad), 255, np.uint8)
    tiles = (np.clip(a, 0, 1) * 255).round().astype(np.uint8).repeat(scale, 1).repeat(scale, 2)
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h * scale + pad), left + pad + c * (w * scale + pad)
        canvas[y:y + h * scale, x:x + w * scale] = tiles[i]
    img = Image.fromarray(canvas, mode="L")
    if row_labels:
        draw = ImageDraw.Draw(img)
        for r, label in enumerate(row_labels[:nrow]):
            draw.text((4, pad + r * (h * scale + pad) + h * scale // 2 - 5), str(label), fill=0)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
