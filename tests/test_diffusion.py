"""The ``diffusion`` generator: contract kit (shipped weights, few steps), options, bundle, latent mode."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

import hygeia
from hygeia.errors import BundleError, InputError, UnsupportedConditionError
from hygeia.testing.contracts import GeneratorContract

FAST = {"steps": 3}


class TestDiffusionContract(GeneratorContract):
    plugin_name = "diffusion"
    generate_options = FAST


@pytest.fixture(scope="module")
def gen():
    return hygeia.create("generator", "diffusion", device="cpu")


def test_progress_per_denoising_step(gen) -> None:
    calls: list[tuple[int, int]] = []
    gen.generate(3, condition="nodule", seed=0, steps=2, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize("opts, name", [
    ({"steps": 0}, "steps"), ({"steps": 1001}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": True}, "steps"),
    ({"guidance_scale": -0.5}, "guidance_scale"), ({"guidance_scale": 21}, "guidance_scale"),
    ({"guidance_scale": math.nan}, "guidance_scale"), ({"guidance_scale": "2"}, "guidance_scale"),
    ({"sampler": "euler"}, "sampler"), ({"batch_size": 0}, "batch_size"), ({"temperature": 1.0}, "options"),
    ({"negative_condition": "atelectasis"}, "negative_condition"), ({"negative_condition": 1}, "negative_condition"),
])
def test_bad_options_fail_before_work(gen, opts, name) -> None:
    calls: list[int] = []
    with pytest.raises(InputError, match=name):
        gen.generate(1, condition="normal", seed=0, progress=lambda d, t: calls.append(d), **opts)
    assert calls == [], "checks must run before any denoising step"


def test_bad_condition_and_n(gen) -> None:
    with pytest.raises(UnsupportedConditionError, match="condition"):
        gen.generate(1, condition="fractured femur", seed=0, **FAST)
    with pytest.raises(UnsupportedConditionError):
        gen.generate(1, condition={"logP": 1.0}, seed=0, **FAST)
    with pytest.raises(InputError, match="n"):
        gen.generate(gen.max_n + 1, condition="normal", seed=0, **FAST)


def test_free_text_is_mapped_to_a_label(gen) -> None:
    """Free text goes to the label whose phrases it is closest to; the images are that label's."""
    assert gen.label_for_text("right pleural effusion")[0] == "effusion"
    assert gen.label_for_text("chest radiograph with an enlarged heart")[0] == "cardiomegaly"
    assert gen.label_for_text("no acute cardiopulmonary abnormality")[0] == "normal"
    by_text = gen.generate(2, condition="right pleural effusion", seed=4, **FAST)
    by_label = gen.generate(2, condition="effusion", seed=4, **FAST)
    assert np.array_equal(np.stack([g.pixels for g in by_text]), np.stack([g.pixels for g in by_label]))
    prov = by_text[0].provenance
    assert by_text[0].condition == "effusion" and prov["condition_kind"] == "text"
    assert prov["text"] == "right pleural effusion" and prov["label_from_text"] == "effusion"
    with pytest.raises(UnsupportedConditionError, match="weather"):
        gen.generate(1, condition="the weather is nice today", seed=0, **FAST)


def test_samplers_guidance_and_batching(gen) -> None:
    ddim = np.stack([g.pixels for g in gen.generate(2, condition="effusion", seed=4, **FAST)])
    dpm = np.stack([g.pixels for g in gen.generate(2, condition="effusion", seed=4, sampler="dpm", **FAST)])
    strong = np.stack([g.pixels for g in gen.generate(2, condition="effusion", seed=4, guidance_scale=6.0, **FAST)])
    uncond = gen.generate(2, condition="effusion", seed=4, guidance_scale=0.0, **FAST)
    assert np.abs(ddim - dpm).mean() > 1e-4 and np.abs(ddim - strong).mean() > 1e-4
    assert uncond[0].provenance["guidance_scale"] == 1.0  # guidance 0 = the unconditional model, unguided
    one_by_one = np.stack([g.pixels for g in gen.generate(2, condition="effusion", seed=4, batch_size=1, **FAST)])
    np.testing.assert_allclose(one_by_one, ddim, atol=1e-4)  # image i depends on (seed, i), not on batching
    assert ddim[0].shape == (1, 64, 64)


def test_sampler_matches_hand_written_diffusers_loop(gen) -> None:
    """Hygeia's sampler is the textbook classifier-free-guidance DDIM loop, step for step."""
    from diffusers import DDIMScheduler

    from hygeia_diffusion.model import NULL_CLASS, denoise, make_scheduler

    noise = torch.randn((2, *gen.sample_shape), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3])
    ours = denoise(gen.unet, make_scheduler(gen.scheduler_config, "ddim"), noise, labels, 4, 2.5)
    sched = DDIMScheduler.from_config(gen.scheduler_config)
    sched.set_timesteps(4)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = gen.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, torch.full_like(labels, NULL_CLASS)])).sample
            c, u = eps.chunk(2)
            x = sched.step(u + 2.5 * (c - u), t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_negative_condition_is_the_guidance_baseline(gen) -> None:
    """A finding is guided away from 'normal' (the bundle's default) instead of the null class:
    eps = eps_normal + s * (eps_label - eps_normal), step for step; "none" is plain guidance."""
    from diffusers import DDIMScheduler

    from hygeia_diffusion.model import NULL_CLASS, denoise, make_scheduler

    assert gen.defaults["negative_condition"] == "normal"
    noise = torch.randn((2, *gen.sample_shape), generator=torch.Generator().manual_seed(0))
    labels, base = torch.tensor([1, 3]), torch.tensor([0, 0])
    ours = denoise(gen.unet, make_scheduler(gen.scheduler_config, "ddim"), noise, labels, 3, 4.0, baseline_labels=base)
    sched = DDIMScheduler.from_config(gen.scheduler_config)
    sched.set_timesteps(3)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            c, u = gen.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, base])).sample.chunk(2)
            x = sched.step(u + 4.0 * (c - u), t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)
    plain = denoise(gen.unet, make_scheduler(gen.scheduler_config, "ddim"), noise, labels, 3, 4.0,
                    baseline_labels=torch.full_like(labels, NULL_CLASS))
    torch.testing.assert_close(plain, denoise(gen.unet, make_scheduler(gen.scheduler_config, "ddim"), noise, labels, 3, 4.0))

    px = lambda out: np.stack([g.pixels for g in out])  # noqa: E731
    default = gen.generate(2, condition="nodule", seed=5, **FAST)
    assert default[0].provenance["negative_condition"] == "normal"
    assert np.array_equal(px(default), px(gen.generate(2, condition="nodule", seed=5, negative_condition="normal", **FAST)))
    none = gen.generate(2, condition="nodule", seed=5, negative_condition="none", **FAST)
    assert none[0].provenance["negative_condition"] is None and np.abs(px(none) - px(default)).mean() > 1e-4
    other = gen.generate(2, condition="nodule", seed=5, negative_condition="effusion", **FAST)
    assert other[0].provenance["negative_condition"] == "effusion" and np.abs(px(other) - px(default)).mean() > 1e-4
    # 'normal' is never guided away from itself: the default gives plain guidance for it
    normal = gen.generate(2, condition="normal", seed=5, **FAST)
    assert normal[0].provenance["negative_condition"] is None
    assert np.array_equal(px(normal), px(gen.generate(2, condition="normal", seed=5, negative_condition="none", **FAST)))


def test_bundle_layout_and_tamper_detection(gen, tmp_path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    sha = gen.save(tmp_path / "b")
    assert sha == gen.identity.weights_sha256
    for part in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "config.json", "model_card.json", "model.safetensors"):
        assert (tmp_path / "b" / part).is_file(), part
    UNet2DModel.from_pretrained(tmp_path / "b" / "unet")  # plain diffusers reads the subfolders
    DDPMScheduler.from_pretrained(tmp_path / "b" / "scheduler")
    size = sum(f.stat().st_size for f in (tmp_path / "b").rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"bundle is {size / 2**20:.1f} MiB"
    w = tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="unet"):
        hygeia.create("generator", "diffusion", bundle=tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "unet")
    with pytest.raises(BundleError, match="missing"):
        hygeia.create("generator", "diffusion", bundle=tmp_path / "b")


def test_latent_mode_round_trip(tmp_path) -> None:
    """Latent mode: a (tiny, untrained) UNet on the shipped vae's latent space, saved and reloaded."""
    from diffusers import DDPMScheduler, UNet2DModel

    from hygeia_diffusion.model import SCHEDULER, UNET
    from hygeia_diffusion.plugin import write_bundle

    vae = hygeia.create("generator", "vae", device="cpu")
    torch.manual_seed(0)
    unet = UNet2DModel(**{**UNET, "in_channels": 4, "out_channels": 4, "sample_size": 16,
                          "block_out_channels": [16, 16, 16], "attention_head_dim": 8, "norm_num_groups": 8})
    config = {"mode": "latent", "patch": 1, "latent_scaling": vae.scaling_factor, "labels": vae.config["priors"][:-1],
              "null_class": 6, "sampling": {"steps": 2}}
    write_bundle(tmp_path / "lat", unet, DDPMScheduler(**{**SCHEDULER, "clip_sample": False}), vae.autoencoder,
                 config, vae.card)
    g = hygeia.create("generator", "diffusion", bundle=tmp_path / "lat", device="cpu")
    assert g.sample_shape == (4, 16, 16)
    out = g.generate(2, condition="normal", seed=0)
    assert out[0].pixels.shape == (1, 64, 64) and out[0].provenance["mode"] == "latent"
    assert (tmp_path / "lat" / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_training_writes_bundle_and_grids(tmp_path) -> None:
    """A tiny run of the real trainer (small UNet): loadable bundle, grids per epoch, reproducible."""
    from hygeia_diffusion.train import train

    small = {"block_out_channels": [16, 16, 16], "attention_head_dim": 8, "norm_num_groups": 8}

    def run(name: str):
        train(out=tmp_path / name, seed=1, progress=False, epochs=2, n_per_class=8, batch_size=16, unet=small,
              samples_dir=tmp_path / f"{name}-grids", cache=tmp_path / "cache")
        return hygeia.create("generator", "diffusion", bundle=tmp_path / name, device="cpu")

    a = run("a")
    assert sorted(p.name for p in (tmp_path / "a-grids").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    assert a.generate(1, condition="nodule", seed=0, steps=2)[0].pixels.shape == (1, 64, 64)
    assert a.config["training"]["seed"] == 1 and a.card.metrics["train_loss_last_epoch"] > 0
    assert a.config["sampling"]["guidance_scale"] == 5.0 == a.defaults["guidance_scale"]  # the trainer's default
    assert run("b").identity.weights_sha256 == a.identity.weights_sha256, "same seed must give the same weights"
    for bad, name in (({"epochs": 0}, "epochs"), ({"mode": "wavelet"}, "mode"), ({"patch": 3}, "patch"),
                      ({"p_uncond": 1.5}, "p_uncond"), ({"colour": 1}, "options"),
                      ({"guidance_scale": 25}, "guidance_scale"), ({"guidance_scale": "5"}, "guidance_scale")):
        with pytest.raises(InputError, match=name):
            train(out=tmp_path / "c", **bad)


def test_training_on_the_latent_of_a_diffusion_bundle(tmp_path) -> None:
    """``--option vae=DIFFUSION_BUNDLE``: the trainer encodes with that bundle's own autoencoder and
    scaling (what reproduces the shipped UNet from the repository alone) and records its vae SHA-256."""
    from hygeia_diffusion.plugin import WEIGHTS
    from hygeia_diffusion.train import train

    shipped = hygeia.create("generator", "diffusion", device="cpu")
    small = {"block_out_channels": [16, 16, 16], "attention_head_dim": 8, "norm_num_groups": 8}
    train(out=tmp_path / "d", seed=1, progress=False, epochs=1, n_per_class=8, batch_size=16, unet=small,
          vae=WEIGHTS, cache=tmp_path / "cache")
    g = hygeia.create("generator", "diffusion", bundle=tmp_path / "d", device="cpu")
    want = shipped.config["training"]["vae_weights_sha256"]
    assert g.config["training"]["vae_weights_sha256"] == want and len(want) == 64
    assert g.config["latent_scaling"] == shipped.config["latent_scaling"]
    theirs = g.space.vae.state_dict()
    for k, v in shipped.space.vae.state_dict().items():  # the same autoencoder, tensor for tensor
        assert torch.equal(v, theirs[k]), k


def test_factory_rejects_bad_dtype() -> None:
    with pytest.raises(InputError, match="dtype"):
        hygeia.create("generator", "diffusion", device="cpu", dtype="float16")
