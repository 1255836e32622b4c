"""Streaming training data: labelled image files -> MONAI datasets -> batches.

Images are read from disk as they are needed (``monai.data.Dataset`` with a transform that uses
:func:`hygeia.data.io.load_image`, so every format and DICOM transfer syntax the core reads works
here), so memory does not grow with the number of images. An image that cannot be read does not
kill a DataLoader worker with a traceback: the item carries the one-line error, and the training
loop raises it as an :class:`~hygeia.errors.InputError` naming the row and the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from hygeia.errors import HygeiaError, InputError


@dataclass(frozen=True)
class Item:
    """One labelled image: ``labels`` float32 per finding, NaN where the label is to be ignored."""

    image: str
    labels: np.ndarray
    patient: str = ""
    text: str = ""
    row: int = 0  # the row of the label file (1-based, header excluded) for error messages


def _clip01(x: Any) -> np.ndarray:
    return np.clip(np.asarray(x, np.float32), 0.0, 1.0)


def augmentation(size: int) -> list[Any]:
    """The training augmentation (MONAI dictionary transforms on ``image``): small shift, rotation
    and zoom (reflection padding), then intensity scale and gamma, as exposure and positioning
    vary between radiographs; back to float32 in [0, 1]."""
    from monai.transforms import Lambdad, RandAdjustContrastd, RandAffined, RandScaleIntensityd

    return [
        RandAffined("image", prob=0.9, rotate_range=0.05, scale_range=0.05,
                    translate_range=(0.03 * size, 0.03 * size), padding_mode="reflection"),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandAdjustContrastd("image", prob=0.5, gamma=(0.8, 1.25)),
        Lambdad("image", _clip01),
    ]


class LoadPrepared:
    """MONAI-style transform: an :class:`Item` dict -> image ``[1, S, S]`` in [0, 1], labels, mask, text."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        from hygeia.data.io import load_image, prepare_image

        labels = np.asarray(d["labels"], np.float32)
        out = {"labels": np.nan_to_num(labels, nan=0.0), "mask": (~np.isnan(labels)).astype(np.float32),
               "index": int(d["index"]), "error": "", "text": str(d.get("text") or "")}
        out["shape"] = np.zeros(2, np.int64)  # the image's own rows and columns (box coordinates are in them)
        try:
            pixels = load_image(d["image"]).pixels
            out["shape"] = np.asarray(np.shape(pixels)[-2:], np.int64)
            out["image"] = prepare_image(pixels, size=(self.size, self.size))
        except HygeiaError as exc:
            out["image"] = np.zeros((1, self.size, self.size), np.float32)
            out["error"] = f"row {d['row']} ({d['image']}): {exc}"
        return out


def dataset(items: Sequence[Item], size: int, augment: bool = False) -> Any:
    """A ``monai.data.Dataset`` that loads and resizes each image when it is asked for; with
    ``augment``, :func:`augmentation` follows (its random state is set per DataLoader worker by
    ``monai.data.DataLoader``, so a seeded run repeats itself)."""
    from monai.data import Dataset

    data = [{"image": it.image, "labels": it.labels, "row": it.row, "index": i, "text": it.text}
            for i, it in enumerate(items)]
    from monai.transforms import Compose

    return Dataset(data=data, transform=Compose([LoadPrepared(size), *(augmentation(int(size)) if augment else [])]))


class ShardedPermutation(torch.utils.data.Sampler):
    """Epoch-seeded permutation, shard ``rank`` of ``world`` taking every ``world``-th position.

    With batch ``B / world`` per rank, step k of the ranks together sees exactly the images step
    k of a single process with batch ``B`` sees, so one process and DDP train on the same global
    batches. ``set_epoch`` reshuffles.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = int(n), int(seed), int(rank), int(world), shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        usable = (len(order) // self.world) * self.world  # every rank the same number of steps
        return iter(order[:usable][self.rank::self.world].tolist())

    def __len__(self) -> int:
        return self.n // self.world


def loader(ds: Any, batch_size: int, sampler: Any, workers: int) -> Any:
    """A ``monai.data.DataLoader`` over ``ds`` (workers > 0: images decode in parallel processes;
    random transforms get their own seeded state per worker)."""
    from monai.data import DataLoader

    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=2)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=False, **kwargs)


def check_batch(batch: dict[str, Any]) -> None:
    """Raise the first unreadable image of ``batch`` as a one-line InputError."""
    errors = [e for e in batch["error"] if e]
    if errors:
        raise InputError("training image", "a readable image file", got=errors[0])


def pos_weight(items: Sequence[Item]) -> np.ndarray:
    """Negatives / positives per finding over the labelled (non-NaN) rows (1 where a class is empty)."""
    y = np.stack([it.labels for it in items])
    known = ~np.isnan(y)
    pos = np.where(known, y > 0.5, False).sum(0)
    neg = np.where(known, y <= 0.5, False).sum(0)
    return np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0).astype(np.float32)


def patient_split(items: Sequence[Item], val_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Split by patient (no patient on both sides), about ``val_fraction`` of the patients to validation."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise InputError("val_fraction", "a number in (0, 1)", got=val_fraction)
    patients = sorted({it.patient or it.image for it in items})
    if len(patients) < 2:
        raise InputError("training data", "images of at least two patients (the split is by patient)",
                         got=f"{len(patients)} patient")
    rng = np.random.default_rng(seed)
    n_val = min(len(patients) - 1, max(1, int(round(val_fraction * len(patients)))))
    val_p = set(rng.permutation(patients)[:n_val].tolist())
    train = [it for it in items if (it.patient or it.image) not in val_p]
    val = [it for it in items if (it.patient or it.image) in val_p]
    return train, val


def split_label_file(data: Any, image_root: Any, uncertain: str | None, text_column: str | None, codes: Any,
                     val_fraction: float, seed: int, progress: bool) -> tuple[Any, Any, Any]:
    """Read a label file (:func:`hygeia.data.labels.read_labels`), check every finding has a code
    (an unmapped one fails here, before any training) and split it by patient: ``(table, train, val)``."""
    from hygeia.data.labels import read_labels

    table = read_labels(data, image_root, uncertain=uncertain or "ignore", text_column=text_column, codes=codes,
                        progress=progress)
    table.codes()
    train_t, val_t = table.patient_split(float(val_fraction), seed)
    return table, train_t, val_t
