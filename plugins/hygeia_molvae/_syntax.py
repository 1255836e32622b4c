"""SMILES syntax during sampling: which tokens may come next, per molecule of a batch.

:class:`SmilesSyntax` follows each sampled row (branch depth, open ring bonds and the atom each
opened on, the kind of the last token) and gives the tokens that would make the string
unparseable whatever came after: a ``)`` with no branch open, an empty branch, a ring bond or a
bond with no atom before it, a ring closed on the atom it opened on or on the next one (a bond
that is already there), or the end of the molecule
while a branch or ring bond is open or right after a bond. The sampler sets their probability to
zero, so it draws from the model's distribution restricted to syntactically valid SMILES. What
syntax cannot see (valence, aromaticity) is left to the model.
"""
from __future__ import annotations

import torch

START, ATOM, OPEN, CLOSE, RING, BOND = range(6)
_BONDS = {"-", "=", "#", "$", ":", "/", "\\", "."}


def token_kinds(vocab: list[str]) -> list[int]:
    """The syntactic kind of every token (special tokens count as START: never sampled)."""
    kinds = []
    for t in vocab:
        if t.startswith("<"):
            kinds.append(START)
        elif t == "(":
            kinds.append(OPEN)
        elif t == ")":
            kinds.append(CLOSE)
        elif t.isdigit() or (t.startswith("%") and t[1:].isdigit()):
            kinds.append(RING)
        elif t in _BONDS:
            kinds.append(BOND)
        else:
            kinds.append(ATOM)
    return kinds


# tokens (by kind, and the end) that may not follow a token of each kind
_FORBIDDEN_AFTER = {START: {OPEN, CLOSE, RING, BOND, "end"}, ATOM: set(), OPEN: {OPEN, CLOSE, RING, "end"},
                    CLOSE: {RING}, RING: set(), BOND: {OPEN, CLOSE, BOND, "end"}}


class SmilesSyntax:
    """Per-row SMILES syntax state of a sampled batch of ``b`` molecules (see the module docstring)."""

    def __init__(self, vocab: list[str], eos: str, b: int) -> None:
        kinds = token_kinds(vocab)
        self.kind = torch.tensor(kinds)
        self.eos, self.close = vocab.index(eos), (kinds.index(CLOSE) if CLOSE in kinds else None)
        self.rings = [i for i, k in enumerate(kinds) if k == RING]
        self.ring_col = torch.full((len(vocab),), -1, dtype=torch.long)
        self.ring_col[self.rings] = torch.arange(len(self.rings))
        self.table = torch.zeros(6, len(vocab), dtype=torch.bool)  # [kind of the last token, next token]
        for prev, banned in _FORBIDDEN_AFTER.items():
            for i, k in enumerate(kinds):
                self.table[prev, i] = k in banned
            self.table[prev, self.eos] = "end" in banned
        self.prev = torch.full((b,), START, dtype=torch.long)
        self.depth = torch.zeros(b, dtype=torch.long)
        self.atoms = torch.zeros(b, dtype=torch.long)
        self.ring_open = torch.zeros(b, len(self.rings), dtype=torch.bool)
        self.ring_atom = torch.zeros(b, len(self.rings), dtype=torch.long)

    def forbidden(self) -> torch.Tensor:
        """``[b, V]`` True where the next token would break the syntax."""
        m = self.table[self.prev]
        if self.close is not None:
            m[:, self.close] |= self.depth == 0
        m[:, self.eos] |= (self.depth > 0) | self.ring_open.any(1)
        if self.rings:
            m[:, self.rings] |= self.ring_open & (self.atoms[:, None] - self.ring_atom <= 1)  # no 1- or 2-rings
        return m

    def update(self, nxt: torch.Tensor) -> None:
        """Advance every row by its sampled token ``nxt [b]``."""
        k = self.kind[nxt]
        self.atoms += k == ATOM
        self.depth += (k == OPEN).long() - (k == CLOSE).long()
        col = self.ring_col[nxt]
        rows = (col >= 0).nonzero()[:, 0]
        if len(rows):
            cols = col[rows]
            opening = ~self.ring_open[rows, cols]
            self.ring_open[rows, cols] = opening
            self.ring_atom[rows[opening], cols[opening]] = self.atoms[rows[opening]]
        self.prev = k

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only the rows ``idx``."""
        self.prev, self.depth, self.atoms = self.prev[idx], self.depth[idx], self.atoms[idx]
        self.ring_open, self.ring_atom = self.ring_open[idx], self.ring_atom[idx]
