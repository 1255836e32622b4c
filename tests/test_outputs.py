from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hygeia.api import GeneratedImage, ModelIdentity
from hygeia.outputs import atomic_path, write_json
from hygeia_lab.grids import image_grid, write_image_grid

MODEL = ModelIdentity("toy", "1.0", "generator", None)


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_grid_layout():
    g = image_grid([np.zeros((4, 4), np.float32)] * 5, ncols=3, pad=1)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1)


def test_generated_images_are_synthetic_and_png_says_so(tmp_path):
    imgs = [GeneratedImage(np.full((1, 8, 8), 0.5, np.float32), (1.0, 1.0), "DX", s, "effusion", MODEL)
            for s in range(2)]
    assert all(i.synthetic for i in imgs)
    with pytest.raises(TypeError):
        GeneratedImage(np.zeros((1, 8, 8), np.float32), (1.0, 1.0), "DX", 0, None, MODEL, synthetic=False)
    im = Image.open(write_image_grid(tmp_path / "g.png", imgs))
    assert im.info["Synthetic"] == "true" and "toy" in im.info["Software"]
    banner = np.asarray(im)[-10:]
    assert banner.max() > 200  # the burned-in SYNTHETIC banner under the grid


def test_atomic_path_refuses_a_folder_or_a_file_on_the_way(tmp_path):
    from hygeia.errors import InputError
    from hygeia.outputs import atomic_dir, atomic_path

    with pytest.raises(InputError, match="expected a file path, got a folder"):
        with atomic_path(tmp_path):
            pass
    blocker = tmp_path / "f"
    blocker.write_text("x")
    for ctx in (atomic_path(blocker / "a.png"), atomic_dir(blocker / "d")):
        with pytest.raises(InputError, match=f"{blocker} is a file"):
            with ctx:
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
