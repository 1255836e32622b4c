"""The lab's training loop: DDP over two processes trains the same weights as one process with the
same global batch, and the pieces it is built from behave as documented."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hygeia.errors import InputError
from hygeia_lab.export import export_phantoms
from hygeia_lab.training import Item, ShardedPermutation, patient_split, pos_weight
from hygeia_lab.training.report import metrics_csv

HERE = Path(__file__).parent


def test_sharded_permutation_covers_the_global_batches():
    one = list(ShardedPermutation(20, seed=3))
    shards = [list(ShardedPermutation(20, seed=3, rank=r, world=2)) for r in range(2)]
    b = 4  # global batch 4 = 2 per rank: step k of both ranks sees step k of one process
    for k in range(5):
        assert sorted(shards[0][2 * k:2 * k + 2] + shards[1][2 * k:2 * k + 2]) == sorted(one[b * k:b * k + b])
    s = ShardedPermutation(20, seed=3)
    s.set_epoch(1)
    assert list(s) != one and sorted(s) == sorted(one)


def test_patient_split_and_pos_weight():
    items = [Item(f"{i}.png", np.array([i % 4 == 0, np.nan], np.float32), patient=f"p{i // 2}") for i in range(40)]
    tr, va = patient_split(items, 0.25, seed=0)
    assert {it.patient for it in tr}.isdisjoint({it.patient for it in va}) and len(tr) + len(va) == 40
    assert pos_weight(items).tolist() == [3.0, 1.0]  # 10 positives, 30 negatives; all-NaN column: 1
    with pytest.raises(InputError, match="two patients"):
        patient_split(items[:2], 0.5, seed=0)


def test_metrics_csv_names_the_findings():
    text = metrics_csv([{"epoch": 1, "train_loss": 0.5, "val_auroc_0": 0.7, "val_auroc_1": 0.8}], ["Edema", "Mass"])
    assert text.decode().splitlines()[0] == "epoch,train_loss,val_auroc_Edema,val_auroc_Mass"


def test_two_process_ddp_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    labels = export_phantoms(tmp_path / "d", layout="chexpert", n=48, size=32, image_format="png", progress=False)
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, str(HERE / "ddp_fit.py"), str(labels), str(one)], check=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(HERE / "ddp_fit.py"), str(labels), str(two)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys()
    sys.path.insert(0, str(HERE))
    from ddp_fit import small_net

    init = small_net(a["4.bias"].numel()).state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3  # training moved the weights
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-4, f"DDP x2 differs from one process by {diff}"


def test_augmentation_varies_images_and_repeats_with_the_seed(tmp_path):
    """``augment``: fetches of an image differ (shift, rotation, zoom, intensity; each transform is
    drawn with its probability, so 2.5 % of fetches keep the image as it is), stay in [0, 1] and
    keep their shape; the same seed gives the same augmented batches (workers or not)."""
    from hygeia_lab.training.data import dataset, loader

    labels = export_phantoms(tmp_path / "x", layout="chexpert", n=6, size=64, image_format="png", progress=False)
    from hygeia.data.labels import read_labels

    items = read_labels(labels).rows
    plain = dataset(items, 64)[0]["image"]
    ds = dataset(items, 64, augment=True)
    torch.manual_seed(0)  # the fetches below do not depend on what earlier tests drew
    fetched = [ds[0]["image"] for _ in range(8)]
    assert all(a.shape == plain.shape == (1, 64, 64) and a.min() >= 0 and a.max() <= 1 for a in fetched)
    assert sum(not np.allclose(a, plain) for a in fetched) >= 6
    assert sum(not np.allclose(a, b) for a, b in zip(fetched, fetched[1:])) >= 6

    def batches(workers: int) -> list[np.ndarray]:
        torch.manual_seed(5)
        dl = loader(dataset(items, 64, augment=True), 3, ShardedPermutation(len(items), 0, shuffle=False), workers)
        return [bt["image"].numpy() for bt in dl]

    for workers in (0, 2):
        one, two = batches(workers), batches(workers)
        assert all(np.array_equal(x, y) for x, y in zip(one, two)), workers


def test_bfloat16_steps_train_a_plain_float32_bundle(tmp_path):
    """``precision=bfloat16`` runs the steps under autocast on channels-last tensors; the bundle it
    writes holds float32 tensors in the plain layout (safetensors needs them contiguous), loads
    into the network, and the card's command repeats the option. Other precisions are refused."""
    import json

    from hygeia.bundles import load_bundle
    from hygeia_cnn._user_data import train_on_files
    from hygeia_cnn.model import DEFAULT_ARCH, CnnNet

    labels = export_phantoms(tmp_path / "d", layout="datalist", n=40, size=32, image_format="png", progress=False)
    out = train_on_files(tmp_path / "b", 0, False, data=labels, epochs=2, size=32, batch_size=8, workers=0, threads=1,
                         precision="bfloat16")
    b = load_bundle(out)
    assert all(t.is_contiguous() and (t.dtype == torch.float32 or not t.is_floating_point()) for t in b.tensors.values())
    CnnNet(DEFAULT_ARCH, n_out=len(b.config["findings"])).load_state_dict(b.tensors)
    assert b.config["training"]["precision"] == "bfloat16"
    assert "--option precision=bfloat16" in json.loads((out / "model_card.json").read_text())["training_data"]
    with pytest.raises(InputError, match="precision.*float32, bfloat16"):
        train_on_files(tmp_path / "x", 0, False, data=labels, epochs=1, size=32, precision="float16")
