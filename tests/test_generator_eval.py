"""Generator evaluation: the metrics on known inputs, the judge logic, and an end-to-end run."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hygeia.errors import BundleError, InputError, PluginNotFoundError
from hygeia_lab.evaluation import generators as ev
from hygeia_lab.grids import write_grid
from hygeia.plugins import get_registry
from hygeia.vocab import FINDING_LABELS


def _noise(n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 16)) + shift


def test_frechet_distance():
    a, b = _noise(500, 0), _noise(500, 1)
    assert ev.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    near = ev.frechet_distance(a, b)
    far = ev.frechet_distance(a, _noise(500, 1, shift=1.0))
    assert near < 1.0 and far == pytest.approx(16.0 + near, rel=0.2)  # |mean diff|^2 = 16 * 1^2


def test_kid_unbiased_near_zero_for_same_distribution():
    same, _ = ev.kernel_inception_distance(_noise(400, 0), _noise(400, 1), subset_size=100)
    diff, std = ev.kernel_inception_distance(_noise(400, 0), _noise(400, 1, shift=0.5), subset_size=100)
    assert abs(same) < 0.05 and diff > 10 * max(abs(same), 1e-3) and std >= 0
    with pytest.raises(InputError):
        ev.kernel_inception_distance(_noise(1, 0), _noise(5, 1))


def test_ms_ssim_diversity():
    rng = np.random.default_rng(0)
    base = rng.random((1, 1, 64, 64)).astype(np.float32)
    assert ev.ms_ssim_diversity(np.repeat(base, 6, 0)) == pytest.approx(1.0, abs=1e-4)  # collapsed: no diversity
    smooth = np.stack([np.full((1, 64, 64), v, np.float32) for v in np.linspace(0.2, 0.8, 6)])
    noisy = rng.random((6, 1, 64, 64)).astype(np.float32)
    assert ev.ms_ssim_diversity(noisy) < 0.2
    assert ev.ms_ssim_diversity(noisy) < ev.ms_ssim_diversity(np.clip(base + 0.05 * noisy, 0, 1))
    with pytest.raises(InputError):
        ev.ms_ssim_diversity(smooth[:1])


def test_shows_condition():
    thr = np.full(5, 0.5)
    probs = np.array([[0.9, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.6, 0.7, 0.1]])
    assert ev.shows_condition(probs, thr, "nodule").tolist() == [True, False, False]
    assert ev.shows_condition(probs, thr, "normal").tolist() == [False, True, False]
    assert ev.shows_condition(probs, thr, "cardiomegaly").tolist() == [False, False, True]


def test_write_grid(tmp_path):
    imgs = np.random.default_rng(0).random((12, 1, 64, 64)).astype(np.float32)
    p = write_grid(imgs, tmp_path / "g.png", ncol=6, row_labels=["normal", "effusion"], scale=1, pad=2)
    with Image.open(p) as im:
        assert im.mode == "L" and im.size[1] == 2 * (64 + 2) + 2 and im.size[0] > 6 * 64
    assert [x.name for x in tmp_path.iterdir()] == ["g.png"], "no temporary file left behind"
    with pytest.raises(InputError):
        write_grid(np.zeros((0, 1, 8, 8)), tmp_path / "e.png")


@pytest.mark.parametrize("n", [0, 5, 10**6, 2.5, True])
def test_bad_n_before_work(n):
    with pytest.raises(InputError, match="n"):
        ev.main("gan", n=n, json_out=True)


def test_unknown_or_wrong_generator():
    with pytest.raises(PluginNotFoundError):
        ev.main("no-such-generator", n=10, json_out=True)
    reg = get_registry()
    mol = [s.name for s in reg.all() if s.kind == "generator" and s.name.startswith("molecule")]
    if not mol:
        pytest.skip("no molecule generator registered")
    try:
        gen = reg.create("generator", mol[0])
    except BundleError:
        pytest.skip(f"{mol[0]}: no weights in this checkout")
    with pytest.raises(InputError, match="image generator"):
        ev.evaluate_generator(gen, None, n=10)


@pytest.fixture(scope="module")
def judge_and_gan():
    reg = get_registry()
    try:
        return reg.create("diagnoser", "cnn"), reg.create("generator", "gan")
    except Exception as exc:  # weights not trained in this checkout
        pytest.skip(f"cnn or gan unavailable: {exc}")


def test_judge_features(judge_and_gan):
    judge, _ = judge_and_gan
    x = np.random.default_rng(0).random((7, 1, 64, 64)).astype(np.float32)
    f = ev.judge_features(judge, x)
    assert f.ndim == 2 and f.shape[0] == 7 and f.shape[1] >= 16 and np.isfinite(f).all()
    np.testing.assert_allclose(f[:3], ev.judge_features(judge, x[:3]), atol=1e-4)


def test_end_to_end_json(judge_and_gan, capsys, tmp_path):
    res = ev.main("gan", n=10, json_out=True, grid=tmp_path / "grid.png")
    printed = json.loads(capsys.readouterr().out)
    for key in ("conditional_accuracy", "frechet", "kid", "ms_ssim_generated", "ms_ssim_real",
                "real_conditional_accuracy", "accuracy_ratio"):
        assert key in printed and printed[key] is not None, key
    assert printed == json.loads(json.dumps({k: v for k, v in res.items()}))
    assert set(printed["per_condition"]) == {"normal", *FINDING_LABELS}
    # what the gan recorded: its bundle's sampling defaults (guidance away from 'normal', not for 'normal')
    assert printed["per_condition"]["effusion"]["sampling"] == {"truncation": None, "guidance_scale": 3.0,
                                                               "negative_condition": "normal"}
    assert printed["per_condition"]["normal"]["sampling"] == {"truncation": None, "guidance_scale": 1.0,
                                                             "negative_condition": None}
    assert 0 <= printed["conditional_accuracy"] <= 1 and printed["frechet"] >= 0
    assert (tmp_path / "grid.png").is_file()


def test_cli_sampling_options_seed_and_condition_kind(judge_and_gan, tmp_path):
    """`hygeia evaluate generator gan --option guidance_scale=1 --condition-kind text --seed 1`
    evaluates the unguided generator on the text prompts; a bad option fails before any work."""
    from typer.testing import CliRunner

    from hygeia.cli import get_app

    app = get_app()

    runner = CliRunner()
    args = ["evaluate", "generator", "gan", "-n", "10", "--json", "--grid", str(tmp_path / "g.png")]
    r = runner.invoke(app, [*args, "--option", "guidance_scale=1", "--condition-kind", "text", "--seed", "1"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["condition_kind"] == "text" and out["seed"] == 1 and out["options"] == {"guidance_scale": 1}
    assert {v["sampling"]["guidance_scale"] for v in out["per_condition"].values()} == {1.0}
    bad = runner.invoke(app, [*args, "--option", "guidance_scale=99"])
    assert isinstance(bad.exception, InputError) and "guidance_scale" in str(bad.exception)
    with pytest.raises(InputError, match="progress"):
        ev.evaluate_generator(judge_and_gan[1], judge_and_gan[0], n=10, options={"progress": True})


def test_real_images_are_held_out_and_conditioned():
    real = ev.real_images(10)
    assert set(real) == {"normal", *FINDING_LABELS}
    assert all(v.shape == (10, 1, 64, 64) for v in real.values())
    assert not np.allclose(real["normal"], real["effusion"])  # different patients per condition
