"""Input checks shared by every plugin: each failure is an InputError naming the input."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import InputError, UnsupportedConditionError
from .vocab import CONDITION_LABELS

MAX_N = 100_000  # hard ceiling on one generate() call; plugins may set a lower one


def check_images(
    images: Any, *, size: tuple[int, int] | None, channels: int = 1, name: str = "images"
) -> np.ndarray:
    """Return ``images`` as float32 ``[B, channels, H, W]``.

    Accepts a numpy array or torch tensor, ``[H, W]``, ``[B, H, W]`` or ``[B, C, H, W]`` of a
    floating dtype, and RGB (C=3) when ``channels`` is 1 (converted to luminance). Raises
    InputError on other dtypes, shapes, sizes, empty batches or non-finite values.
    """
    if hasattr(images, "detach"):  # torch.Tensor
        images = images.detach().cpu().numpy()
    if isinstance(images, (list, tuple)):
        try:
            images = np.stack([np.asarray(i) for i in images])
        except ValueError:
            raise InputError(name, "images of one shape", got="a list of differently shaped arrays") from None
    if not isinstance(images, np.ndarray):
        raise InputError(name, "a numpy array or torch tensor", got=type(images).__name__)
    if not np.issubdtype(images.dtype, np.floating):
        raise InputError(name, "a floating-point array (float32, intensities in [0, 1])", got=f"dtype {images.dtype}")
    a = images.astype(np.float32, copy=False)
    if a.ndim == 2:
        a = a[None, None]
    elif a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise InputError(name, "shape [H, W], [B, H, W] or [B, C, H, W]", got=f"shape {list(images.shape)}")
    if a.shape[0] == 0:
        raise InputError(name, "at least one image", got="an empty batch")
    if a.shape[1] != channels:
        if channels == 1 and a.shape[1] == 3:
            a = (0.299 * a[:, 0:1] + 0.587 * a[:, 1:2] + 0.114 * a[:, 2:3]).astype(np.float32)
        else:
            raise InputError(name, f"{channels} channel(s) (or 3 for RGB)", got=f"{a.shape[1]} channels")
    if size is not None and tuple(a.shape[2:]) != tuple(size):
        raise InputError(name, f"images of {size[0]}x{size[1]} pixels (resize with hygeia.data.prepare_image)",
                         got=f"{a.shape[2]}x{a.shape[3]}")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise InputError(name, "finite pixel values", got=f"{bad} NaN/inf pixel(s)")
    return np.ascontiguousarray(a)


def check_texts(texts: Sequence[str] | None, batch: int, name: str = "texts") -> list[str] | None:
    """``None`` or one string per image."""
    if texts is None:
        return None
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if len(texts) != batch:
        raise InputError(name, f"one string per image ({batch})", got=f"{len(texts)} strings")
    for t in texts:
        if not isinstance(t, str):
            raise InputError(name, "strings", got=type(t).__name__)
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(name, "UTF-8 text", got=ascii(t)[:60]) from None
    return texts


def check_n(n: Any, max_n: int = MAX_N, name: str = "n") -> int:
    """A positive integer no larger than ``max_n``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise InputError(name, "a positive integer", got=repr(n))
    if n <= 0:
        raise InputError(name, "a positive integer (n > 0)", got=n)
    if n > max_n:
        raise InputError(name, f"at most {max_n} per call (memory)", got=n)
    return int(n)


def check_guidance_scale(scale: Any, max_scale: float = 20.0, name: str = "guidance_scale") -> float:
    """A finite guidance scale in ``[0, max_scale]`` (1: no guidance), else an InputError naming it."""
    if (isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not math.isfinite(scale)
            or not 0 <= scale <= max_scale):
        raise InputError(name, f"a number in [0, {max_scale:g}]", got=repr(scale))
    return float(scale)


def check_heatmaps(value: Any, modes: Sequence[Any], name: str = "heatmaps") -> Any:
    """``value`` if it is None or one of ``modes`` (a diagnoser's ``heatmap_modes``), else an
    InputError naming it and listing what it takes."""
    if value is not None and value not in modes:
        shown = ["None", *(repr(m) for m in (True, False) if m in modes),
                 *(repr(m) for m in modes if not isinstance(m, bool))]
        raise InputError(name, ", ".join(shown[:-1]) + " or " + shown[-1], got=repr(value))
    return value


def check_seed(seed: Any, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise InputError(name, "an integer in [0, 2**63)", got=repr(seed))
    return int(seed)


def condition_kind(condition: Any) -> str:
    """Classify a condition: ``none``, ``label`` (a vocabulary label), ``text``, ``properties``."""
    if condition is None or (isinstance(condition, str) and not condition.strip()):
        return "none"
    if isinstance(condition, str):
        return "label" if condition.strip().lower() in CONDITION_LABELS else "text"
    if isinstance(condition, dict):
        return "properties"
    return type(condition).__name__


def check_condition(condition: Any, supported: frozenset[str] | set[str], plugin: str) -> str:
    """Return the condition's kind, or raise UnsupportedConditionError naming what the plugin takes."""
    kind = condition_kind(condition)
    if kind not in supported:
        raise UnsupportedConditionError(
            f"condition for {plugin!r}",
            "one of: " + ", ".join(sorted(supported)) + f" (labels: {', '.join(CONDITION_LABELS)})",
            got=f"{kind} {condition!r}"[:200],
        )
    return kind


_KINDS: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "text"),
    dict: (lambda v: isinstance(v, Mapping), 'a JSON object, e.g. {"key": 1}'),
    list: (lambda v: isinstance(v, (list, tuple)), "a JSON list, e.g. [1, 2]"),
}


def kind_error(kind: type, value: Any) -> str | None:
    """What ``value`` should have been to be of ``kind`` (``bool``, ``int``, ``float``: any number
    but a bool, ``str``, ``dict``, ``list``), e.g. ``"a number"``; None when it is."""
    ok, what = _KINDS[kind]
    return None if ok(value) else what


def check_option_values(values: Mapping[str, Any], defaults: Mapping[str, Any], name: str = "option") -> None:
    """Each value of a known option has its default's kind: a number for a numeric default (not
    a bool or a string), true/false for a bool, text for a string, a mapping or list for one.
    Options without a default (``None``) or not in ``defaults`` are left to the caller."""
    for key, value in values.items():
        default = defaults.get(key)
        if default is None or value is None:
            continue
        kind = next((k for k, types in ((bool, bool), (float, (int, float)), (str, str), (dict, Mapping),
                                        (list, (list, tuple))) if isinstance(default, types)), None)
        why = kind_error(kind, value) if kind is not None else None
        if why is not None:
            raise InputError(f"{name} {key}", why, got=repr(value))
