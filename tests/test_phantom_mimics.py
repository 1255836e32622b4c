"""Look-alikes of absent findings (``make_phantom(..., mimics=)``): what they change and what not."""
from __future__ import annotations

import numpy as np
import pytest

from hygeia.errors import InputError
from hygeia_lab.phantoms import MIMIC_RATES, load_npz, make_phantom, make_phantom_set, save_npz


def test_look_alikes_change_only_the_image():
    """Labels, masks, regions and text are those of ``mimics=0``; the image changes exactly when a
    look-alike of an absent finding was drawn."""
    changed = 0
    for seed in range(12):
        p, q = make_phantom(seed, size=64), make_phantom(seed, size=64, mimics=1.0)
        assert q.labels == p.labels and q.text == p.text and q.regions == p.regions
        assert set(q.masks) == set(p.masks) and all(np.array_equal(q.masks[k], p.masks[k]) for k in p.masks)
        names = q.meta["mimics"]
        assert set(names) <= set(MIMIC_RATES) and not any(p.labels[n] for n in names)
        assert np.array_equal(q.image, p.image) == (not names)
        changed += bool(names)
    assert changed >= 3
    assert "mimics" not in make_phantom(0, size=64).meta  # mimics=0 draws the same phantom as before


def test_look_alike_rates_follow_mimics():
    """On normal phantoms each look-alike appears at about ``mimics * MIMIC_RATES[name]``."""
    n = 300
    seen = {k: 0 for k in MIMIC_RATES}
    for seed in range(n):
        for name in make_phantom(seed, size=16, findings=[], mimics=0.5).meta["mimics"]:
            seen[name] += 1
    for name, rate in MIMIC_RATES.items():
        assert seen[name] / n == pytest.approx(0.5 * rate, abs=0.08), name


def test_a_skin_fold_adds_a_line_and_no_gas():
    """A pneumothorax look-alike (a skin fold) only adds density: a real pneumothorax darkens the
    pleural space and removes the lung markings."""
    folds = 0
    for seed in range(80):
        q = make_phantom(seed, size=64, findings=[], mimics=1.0)
        if q.meta["mimics"] != ["pneumothorax"]:
            continue
        d = q.image - make_phantom(seed, size=64, findings=[]).image
        assert d.min() >= -1e-6 and d.max() > 0.01
        real = make_phantom(seed, size=64, findings=["pneumothorax"]).image
        assert (real - make_phantom(seed, size=64, findings=[]).image).min() < -0.01
        folds += 1
    assert folds >= 2


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "half", None])
def test_bad_mimics_is_refused(bad):
    with pytest.raises(InputError, match="mimics"):
        make_phantom(0, size=16, mimics=bad)


def test_sets_record_their_look_alike_rate(tmp_path):
    ps = make_phantom_set(4, "val", size=32, mimics=0.5)
    assert ps.mimics == 0.5 and ps.subset([0, 1]).mimics == 0.5
    assert np.array_equal(ps.images[2, 0], make_phantom(int(ps.seeds[2]), size=32, mimics=0.5).image)
    back = load_npz(save_npz(tmp_path / "m.npz", ps))
    assert back.mimics == 0.5 and np.array_equal(back.images, ps.images)
    assert load_npz(save_npz(tmp_path / "z.npz", make_phantom_set(2, "val", size=16))).mimics == 0.0
