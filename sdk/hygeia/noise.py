"""Seeded noise equal to torch's CPU generator, drawn with numpy (for runners without torch).

Hygeia's generators draw their noise from ``torch.Generator().manual_seed(seed)`` on the CPU, so a
seed gives the same images on every device. A frozen runner (:mod:`hygeia.frozen`) must draw the
same numbers without importing torch. :class:`TorchGenerator` does, from torch's documented
algorithm:

- the generator is a standard MT19937 seeded with the seed's low 32 bits (``init_genrand``, what
  numpy's legacy ``RandomState(seed)`` uses too);
- ``torch.rand`` (float32) maps each 32-bit output ``x`` to ``(x & (2**24 - 1)) / 2**24``;
- ``torch.randn`` of a contiguous float32 tensor of at least 16 values fills it with such uniform
  numbers, then turns each block of 16 into normals by Box-Muller (``u1 = 1 - d[j]``,
  ``u2 = d[j + 8]`` for ``j < 8``: the cosines first, then the sines); when the size is not a
  multiple of 16, 16 more uniform numbers make the last 16 values;
- a ``torch.randn`` of fewer than 16 values draws each value in double precision: two 53-bit
  uniform numbers ``u1, u2`` (each from two 32-bit outputs, the first in the high half), the
  value ``sqrt(-2 log(1 - u2)) cos(2 pi u1)``, and the sine kept for the next such value.

Uniform numbers are bit-identical to torch's; normals agree within about 2e-6 (torch computes the
logarithm and sines of large tensors in float32).
"""
from __future__ import annotations

import math

import numpy as np

BLOCK = 16


class TorchGenerator:
    """The numbers ``torch.Generator().manual_seed(seed)`` gives, in order: ``rand`` and ``randn``
    advance one stream, as torch's calls on one generator do."""

    def __init__(self, seed: int) -> None:
        state = np.random.RandomState(int(seed) & 0xFFFFFFFF).get_state(legacy=False)
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": state["state"]}
        self._next_normal: float | None = None  # torch's cached second value of the double path

    def _uniform(self, n: int) -> np.ndarray:
        raw = self._bits.random_raw(n).astype(np.uint32)
        return (raw & 0xFFFFFF).astype(np.float32) * np.float32(2.0 ** -24)

    def rand(self, *shape: int) -> np.ndarray:
        """``torch.rand(*shape, generator=g)``: float32 in [0, 1)."""
        return self._uniform(math.prod(shape)).reshape(shape)

    def randn(self, *shape: int) -> np.ndarray:
        """``torch.randn(*shape, generator=g)``: float32 standard normal."""
        n = math.prod(shape)
        if n < BLOCK:
            return np.array([self._double_normal() for _ in range(n)], np.float32).reshape(shape)
        data = self._uniform(n)
        full = n // BLOCK * BLOCK
        data[:full] = _box_muller(data[:full])
        if n % BLOCK:
            data[n - BLOCK:] = _box_muller(self._uniform(BLOCK))
        return data.reshape(shape)


    def _double_normal(self) -> float:
        if self._next_normal is not None:
            value, self._next_normal = self._next_normal, None
            return value
        raw = [int(v) for v in self._bits.random_raw(4)]
        u1, u2 = ((((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0 ** -53 for hi, lo in (raw[0:2], raw[2:4]))
        radius, theta = math.sqrt(-2.0 * math.log1p(-u2)), 2.0 * math.pi * u1
        self._next_normal = radius * math.sin(theta)
        return radius * math.cos(theta)


def _box_muller(u: np.ndarray) -> np.ndarray:
    d = u.reshape(-1, BLOCK).astype(np.float64)
    radius = np.sqrt(-2.0 * np.log(1.0 - d[:, :BLOCK // 2]))
    theta = 2.0 * math.pi * d[:, BLOCK // 2:]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], 1).astype(np.float32).reshape(-1)
