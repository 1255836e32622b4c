"""Training throughput and memory of a diagnoser on labelled image files, side by side in one run.

    python benchmarks/training.py [--size 256] [--n 2000] [--steps 20] [--batch 16] [--archs cxr,resnet18,densenet121,efficientnet-b0]

Prints, for MONAI networks at ``--size`` px (one input channel, five findings; ``cxr`` is the
default diagnoser's ResNet, ``ARCH_256``), trained through Hygeia's streaming pipeline
(``hygeia_lab.training``: PNG files read by ``hygeia.data.io`` in DataLoader workers, masked
class-weighted BCE, AdamW):

- training images/s of each architecture in one process;
- DDP with 2 processes (torchrun, gloo) against one process, same global batch, same network;
- peak RSS of the training process for 2,000 images against 20,000 (the 20,000 are hard links
  to the 2,000 files, so the folder holds 20,000 distinct paths; memory must not grow with it).

The phantom PNGs are written once into ``--cache`` (default ``out/bench-training``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_images(cache: Path, n: int, size: int) -> list[tuple[str, list[float]]]:
    """``n`` phantom PNGs (16-bit) and their labels, written once; returns (path, labels)."""
    from PIL import Image

    from hygeia_lab import make_phantom_set

    index = cache / f"index_{n}_{size}.json"
    if index.is_file():
        return [tuple(x) for x in json.loads(index.read_text())]  # type: ignore[misc]
    cache.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, list[float]]] = []
    for start in range(0, n, 200):
        ps = make_phantom_set(min(200, n - start), "train", size=size, start=start, progress=False)
        for i in range(len(ps)):
            p = cache / f"img_{size}_{start + i:06d}.png"
            Image.fromarray((ps.images[i, 0] * 65535).round().astype(np.uint16)).save(p)
            rows.append((str(p), ps.labels[i].tolist()))
        print(f"  wrote {start + len(ps)}/{n} phantoms", file=sys.stderr)
    index.write_text(json.dumps(rows))
    return rows


def hard_links(rows: list[tuple[str, list[float]]], cache: Path, n: int) -> list[tuple[str, list[float]]]:
    """``n`` distinct paths, hard links to ``rows``' files in turn."""
    d = cache / f"links_{n}"
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        src, lab = rows[k % len(rows)]
        dst = d / f"{k:06d}_{Path(src).name}"
        if not dst.exists():
            os.link(src, dst)
        out.append((str(dst), lab))
    return out


def network(arch: str) -> "object":
    from monai.networks import nets

    if arch == "cxr":  # the default diagnoser's network (hygeia_cnn ARCH_256)
        from hygeia_cnn.model import ARCH_256, CnnNet

        return CnnNet(ARCH_256, n_out=5)
    if arch == "resnet18":
        return nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=5)
    if arch == "densenet121":
        return nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=5)
    if arch == "efficientnet-b0":
        return nets.EfficientNetBN("efficientnet-b0", spatial_dims=2, in_channels=1, num_classes=5, pretrained=False)
    raise SystemExit(f"unknown --arch {arch!r}")


def run_steps(rows: list, arch: str, size: int, steps: int, batch: int, workers: int) -> dict:
    """Train ``steps`` steps (after 2 warm-up steps); images/s over the timed steps, per the whole job."""
    import torch

    from hygeia_lab.training import Item, ShardedPermutation, init_distributed, leave_distributed
    from hygeia_lab.training.data import dataset, loader
    from hygeia_lab.training.loop import _masked_bce

    rank, world = init_distributed()
    torch.manual_seed(0)
    net = network(arch)
    model = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    items = [Item(p, np.asarray(lab, np.float32), row=i + 1) for i, (p, lab) in enumerate(rows)]
    dl = loader(dataset(items, size), batch // world, ShardedPermutation(len(items), 0, rank, world), workers)
    it = iter(dl)
    pw = torch.ones(5)
    times = []
    for step in range(steps + 2):
        t0 = time.perf_counter()  # the whole step: waiting for the batch (decode in the workers) included
        b = next(it)
        opt.zero_grad()
        loss = _masked_bce(model(b["image"].float()), b["labels"].float(), b["mask"].float(), pw)
        loss.backward()
        opt.step()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    if world > 1:
        leave_distributed()
    import resource

    return {"arch": arch, "world": world, "rank": rank, "images_per_s": batch * len(times) / sum(times),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def subprocess_run(args: list[str], nproc: int = 1) -> list[dict]:
    """Run this script as a worker (``nproc`` > 1: under torchrun); one JSON line per rank back."""
    base = [sys.executable, __file__, "--worker", *args]
    if nproc > 1:
        base = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                __file__, "--worker", *args]
    t0 = time.perf_counter()
    r = subprocess.run(base, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(2 // nproc or 1)})
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    out = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    for o in out:
        o["wall_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--archs", default="cxr,resnet18,densenet121,efficientnet-b0")
    ap.add_argument("--cache", type=Path, default=Path("out/bench-training"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="resnet18", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        rows = json.loads(a.rows.read_text())
        print(json.dumps(run_steps(rows, a.arch, a.size, a.steps, a.batch, a.workers)), flush=True)
        return
    rows = write_images(a.cache, a.n, a.size)
    common = ["--size", str(a.size), "--steps", str(a.steps), "--batch", str(a.batch), "--workers", str(a.workers)]
    small = a.cache / "rows_small.json"
    small.write_text(json.dumps(rows))
    big = a.cache / "rows_big.json"
    big.write_text(json.dumps(hard_links(rows, a.cache, 10 * a.n)))
    print(f"training at {a.size} px, batch {a.batch}, {a.steps} timed steps, {a.workers} loader workers")
    speeds = {}
    for arch in a.archs.split(","):
        r = subprocess_run([*common, "--arch", arch, "--rows", str(small)])[0]
        speeds[arch] = r["images_per_s"]
        print(f"  {arch:16s} one process: {r['images_per_s']:7.1f} images/s")
    arch = a.archs.split(",")[0]
    one = speeds[arch]
    ddp = subprocess_run([*common, "--arch", arch, "--rows", str(small)], nproc=2)
    ddp_speed = min(r["images_per_s"] for r in ddp)
    print(f"  {arch} DDP x2 (gloo, same global batch): {ddp_speed:7.1f} images/s; ratio to one process "
          f"{ddp_speed / one:.2f}")
    rss = {}
    for name, path in (("2k", small), ("20k", big)):
        rss[name] = subprocess_run([*common, "--arch", arch, "--rows", str(path)])[0]["max_rss_mb"]
    print(f"  peak RSS {arch}: {a.n} images {rss['2k']:.0f} MB, {10 * a.n} images {rss['20k']:.0f} MB "
          f"(ratio {rss['20k'] / rss['2k']:.2f}; target within 1.2)")


if __name__ == "__main__":
    main()
