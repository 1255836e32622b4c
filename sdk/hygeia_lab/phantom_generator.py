"""The ``phantom`` generator: :func:`hygeia_lab.phantoms.make_phantom` behind the Generator protocol.

It has no weights: images are drawn procedurally, reproducibly from the seed. Image ``i`` of
``generate(n, seed=s)`` uses the phantom seed ``SeedSequence([0x5048414E, s, i])`` (a
generator-only stream, never one of the train/val/test split seeds).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from hygeia.api import GeneratedImage, ModelCard, ModelIdentity, PluginSpec
from hygeia import tensors
from .phantoms import DEFAULT_DIFFICULTY, Phantom, make_phantom
from hygeia.errors import InputError
from hygeia.validation import check_condition, check_n, check_seed
from hygeia.vocab import NORMAL, finding

NAME, VERSION = "phantom", "1.0.0"
SIZES = (64, 128)
MAX_N = 10_000
_STREAM = 0x5048414E  # "PHAN"

CARD = ModelCard(
    intended_use=("Synthetic chest-radiograph-like test images with known findings, masks and clinical text, "
                  "for developing and testing Hygeia plugins. Not for clinical use; not a patient image."),
    training_data="None: procedural (hygeia_lab.phantoms), drawn from the seed.",
    metrics={"difficulty_default": DEFAULT_DIFFICULTY, "field_of_view_mm": 350.0},
    limitations=("Stylised anatomy and findings; realistic in layout, prevalence and subtlety only to a point. "
                 "Model metrics measured on phantoms do not transfer to real radiographs."),
)


def phantom_seed(seed: int, index: int) -> int:
    """The phantom seed of image ``index`` of ``generate(..., seed=seed)``."""
    return int(np.random.SeedSequence([_STREAM, seed, index]).generate_state(1, np.uint64)[0])


class PhantomGenerator:
    """``generate(n, condition=None | "normal" | "effusion" ..., seed=0, size=64, difficulty=...)``."""

    output = "image"
    condition_kinds = frozenset({"none", "label"})

    def __init__(self, size: int = 64, difficulty: float = DEFAULT_DIFFICULTY, **_: Any) -> None:
        self.size = self._size(size)
        self.difficulty = float(difficulty)
        self.identity = ModelIdentity(NAME, VERSION, "generator", None)

    @staticmethod
    def _size(size: Any) -> int:
        if isinstance(size, bool) or size not in SIZES:
            raise InputError("size", f"one of {SIZES}", got=repr(size))
        return int(size)

    def generate(self, n: int, condition: Any = None, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None, **options: Any) -> list[GeneratedImage]:
        n = check_n(n, MAX_N)
        seed = check_seed(seed)
        kind = check_condition(condition, self.condition_kinds, NAME)
        size = self._size(options.pop("size", self.size))
        difficulty = options.pop("difficulty", self.difficulty)
        if options:
            raise InputError("options", "size, difficulty", got=", ".join(sorted(options)))
        findings = None
        label = None
        if kind == "label":
            ft = finding(condition)
            label = ft.label
            findings = [] if ft is NORMAL else [ft.label]
        out: list[GeneratedImage] = []
        for i in range(n):
            ps = phantom_seed(seed, i)
            p = make_phantom(ps, size=size, findings=findings, difficulty=difficulty)
            image = as_generated_image(p, self.identity, seed=seed, condition=label)
            image.provenance.update(generator=NAME, version=VERSION, seed=seed, index=i, difficulty=float(difficulty),
                                    size=size, condition=label)
            out.append(image)
            if progress is not None:
                progress(i + 1, n)
        return out


def as_generated_image(p: Phantom, identity: ModelIdentity, seed: int | None = None,
                       condition: Any = None) -> GeneratedImage:
    """A phantom as a :class:`hygeia.api.GeneratedImage` (what output formats such as ``dicom-dx`` write)."""
    return GeneratedImage(
        pixels=p.image[None], pixel_spacing=p.pixel_spacing, modality="DX",
        seed=p.seed if seed is None else seed, condition=condition, model=identity,
        provenance={"phantom_seed": p.seed, "labels": {k: bool(v) for k, v in p.labels.items()}, "text": p.text,
                    "sex": p.meta.get("sex", "O"), "age": p.meta.get("age", 50), "synthetic": True})


SPEC = PluginSpec(
    kind="generator",
    name=NAME,
    version=VERSION,
    description="Procedural chest-radiograph phantoms with findings (no weights; hygeia_lab.phantoms.make_phantom)",
    factory=PhantomGenerator,
    **tensors.generator("image"),
    model_card=CARD,
)
