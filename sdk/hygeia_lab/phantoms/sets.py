"""Phantom sets: held-out splits by seed, sets as arrays (serial or over processes), atomic .npz
files, and class-conditional training sets.

A private module of :mod:`hygeia_lab.phantoms` (its public names are re-exported there).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hygeia.errors import InputError
from hygeia.vocab import CONDITION_LABELS, FINDING_LABELS

from .render import DEFAULT_DIFFICULTY, make_phantom

SPLITS: dict[str, int] = {"train": 1, "val": 2, "test": 3}
"""Split names and their ids: split ``s`` image ``i`` has the seed drawn from
``SeedSequence([SPLITS[s], i])``, so held-out splits never reuse a training seed."""


@dataclass
class PhantomSet:
    """A batch of phantoms as arrays (what training and evaluation use)."""

    images: np.ndarray  # float32 [N, 1, H, W]
    labels: np.ndarray  # float32 [N, 5]
    masks: np.ndarray  # bool [N, 5, H, W]
    texts: list[str]
    seeds: np.ndarray  # uint64 [N]
    split: str = ""
    difficulty: float = DEFAULT_DIFFICULTY
    mimics: float = 0.0  # the look-alike rate they were drawn with (make_phantom's ``mimics``)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def look(self) -> str:
        """How the set was drawn, for titles: ``"difficulty 0.5, look-alikes 1"``."""
        return f"difficulty {self.difficulty:g}" + (f", look-alikes {self.mimics:g}" if self.mimics else "")

    def subset(self, idx: Any) -> PhantomSet:
        idx = np.asarray(idx)
        return PhantomSet(self.images[idx], self.labels[idx], self.masks[idx],
                          [self.texts[i] for i in np.arange(len(self))[idx]], self.seeds[idx],
                          self.split, self.difficulty, self.mimics)


def split_seeds(n: int, split: str = "train", start: int = 0) -> np.ndarray:
    """Seeds of images ``start .. start+n-1`` of a split (``SeedSequence([split_id, index])``)."""
    if split not in SPLITS:
        raise InputError("split", f"one of {', '.join(SPLITS)}", got=repr(split))
    out = np.empty(n, np.uint64)
    for i in range(n):
        out[i] = np.random.SeedSequence([SPLITS[split], start + i]).generate_state(1, np.uint64)[0]
    return out


def make_phantom_set(
    n: int,
    split: str = "train",
    size: int = 64,
    difficulty: float = DEFAULT_DIFFICULTY,
    progress: bool = False,
    findings: Sequence[str] | None = None,
    start: int = 0,
    workers: int = 1,
    mimics: float = 0.0,
) -> PhantomSet:
    """``n`` phantoms of a split as arrays; images ``[N,1,H,W]``, labels ``[N,5]``, masks ``[N,5,H,W]``.

    ``workers > 1`` draws chunks in that many processes; the result is identical to ``workers=1``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise InputError("n", "a positive integer", got=repr(n))
    seeds = split_seeds(int(n), split, start)
    if workers > 1 and n >= 64:
        return _parallel_set(seeds, split, size, (difficulty, mimics), progress, findings, int(workers))
    images = np.empty((n, 1, size, size), np.float32)
    labels = np.zeros((n, len(FINDING_LABELS)), np.float32)
    masks = np.zeros((n, len(FINDING_LABELS), size, size), bool)
    texts: list[str] = []

    def work(i: int) -> None:
        p = make_phantom(int(seeds[i]), size=size, findings=findings, difficulty=difficulty, mimics=mimics)
        images[i, 0] = p.image
        labels[i] = p.label_vector()
        _fill_masks(masks[i], p.masks)
        texts.append(p.text)

    _loop(n, work, progress, f"phantoms ({split}, {size}x{size})")
    return PhantomSet(images, labels, masks, texts, seeds, split, float(difficulty), float(mimics))


def _fill_masks(dst: np.ndarray, masks: dict[str, np.ndarray]) -> None:
    """Copy a phantom's masks into ``dst`` ``[5, H, W]`` in :data:`FINDING_LABELS` order."""
    for j, k in enumerate(FINDING_LABELS):
        if k in masks:
            dst[j] = masks[k]


def _chunk(args: tuple[np.ndarray, int, tuple[float, float], Sequence[str] | None]) -> tuple[np.ndarray, ...]:
    """Phantoms of some seeds as arrays (images, labels, masks, texts): the work of one process."""
    seeds, size, (difficulty, mimics), findings = args
    ps = [make_phantom(int(s), size=size, findings=findings, difficulty=difficulty, mimics=mimics) for s in seeds]
    masks = np.zeros((len(ps), len(FINDING_LABELS), size, size), bool)
    for i, p in enumerate(ps):
        _fill_masks(masks[i], p.masks)
    return (np.stack([p.image for p in ps])[:, None], np.stack([p.label_vector() for p in ps]), masks,
            np.array([p.text for p in ps]))


def _parallel_set(seeds: np.ndarray, split: str, size: int, look: tuple[float, float], progress: bool,
                  findings: Sequence[str] | None, workers: int) -> PhantomSet:
    """:func:`make_phantom_set` over ``workers`` processes, in chunks of 256 seeds (same result)."""
    from concurrent.futures import ProcessPoolExecutor

    chunks = [seeds[i:i + 256] for i in range(0, len(seeds), 256)]
    parts: list[tuple[np.ndarray, ...]] = []
    with ProcessPoolExecutor(workers) as ex:
        results = ex.map(_chunk, [(c, size, look, findings) for c in chunks])
        it = iter(results)
        _loop(len(chunks), lambda i: parts.append(next(it)), progress,
              f"phantoms ({split}, {size}x{size}, {workers} workers, chunks of 256)")
    return PhantomSet(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                      np.concatenate([p[2] for p in parts]), [str(t) for p in parts for t in p[3]], seeds, split,
                      float(look[0]), float(look[1]))


def _loop(n: int, fn: Callable[[int], None], progress: bool, what: str) -> None:
    """``fn(i)`` for ``i < n``, with a progress bar when ``progress``."""
    if not progress:
        for i in range(n):
            fn(i)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task(what, total=n)
        for i in range(n):
            fn(i)
            bar.advance(task)


def save_npz(path: str | os.PathLike[str], phantom_set: PhantomSet) -> Path:
    """Write a PhantomSet atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez_compressed(tmp, images=phantom_set.images, labels=phantom_set.labels, masks=phantom_set.masks,
                            texts=np.array(phantom_set.texts, dtype=str), seeds=phantom_set.seeds,
                            split=np.array(phantom_set.split), difficulty=np.array(phantom_set.difficulty),
                            mimics=np.array(phantom_set.mimics),
                            finding_labels=np.array(FINDING_LABELS), synthetic=np.array(True))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_npz(path: str | os.PathLike[str]) -> PhantomSet:
    """Read a PhantomSet written by :func:`save_npz`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if tuple(str(s) for s in z["finding_labels"]) != FINDING_LABELS:
                raise InputError(str(path), f"a phantom set with findings {FINDING_LABELS}")
            return PhantomSet(z["images"], z["labels"], z["masks"], [str(t) for t in z["texts"]], z["seeds"],
                              str(z["split"]), float(z["difficulty"]),
                              float(z["mimics"]) if "mimics" in z.files else 0.0)
    except (OSError, KeyError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(str(path), "a phantom .npz written by hygeia_lab.phantoms.save_npz", got=str(exc)[:200]) from None


def class_conditional_set(n_per_class: int, size: int = 64, cache: str | Path | None = None,
                          progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A class-conditional training set: images ``[N, 1, size, size]``, condition indices ``[N]``
    (into ``hygeia.vocab.CONDITION_LABELS``).

    Label ``k`` uses training-split seeds ``k*n .. (k+1)*n - 1`` with ``findings=[label]``, so each
    condition is clean and no two conditions share a patient. ``cache``: a folder for the .npz files.
    """
    images, conds = [], []
    for k, label in enumerate(CONDITION_LABELS):
        f = Path(cache) / f"train_{label}_{n_per_class}_{size}.npz" if cache else None
        if f is not None and f.is_file():
            ps = load_npz(f)
        else:
            ps = make_phantom_set(n_per_class, split="train", size=size, findings=[label], start=k * n_per_class,
                                  progress=progress)
            if f is not None:
                save_npz(f, ps)
        images.append(ps.images)
        conds.append(np.full(len(ps), k, np.int64))
    return np.concatenate(images), np.concatenate(conds)
