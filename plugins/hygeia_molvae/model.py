"""The ``molecule-vae``'s network: a conditional SMILES VAE, and its tokenizer.

Representation: SMILES, tokenised into atoms and bonds with the regular expression of
Schwaller et al. (``Cl``, ``Br``, ``[nH]`` are single tokens). SELFIES would make every sample
valid by construction, but with equal training its samples matched the MOSES distribution
worse (higher FCD); a SMILES decoder learns validity quickly, and the distribution is what the
metrics reward. Invalid samples are kept in the output and flagged ``valid=False``.

Model: a bidirectional GRU encoder -> ``q(z | x, c)``, a GRU decoder ``p(x | z, c)`` whose
initial state and every input step see ``[z, c]``; ``c`` is the ``property`` conditioner's
vector (standardised logP, QED, SA, MW plus presence flags, :data:`COND_DIM` numbers).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

PROPS = ("logP", "QED", "SA", "MW")
COND_DIM = 2 * len(PROPS)
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
_TOKEN_RE = re.compile(
    r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|/|:|~|@|\?|>|\*|\$|%[0-9]{2}|[0-9])"
)


def tokenize(smiles: str) -> list[str] | None:
    """SMILES -> tokens, or None when the regex does not cover the whole string."""
    tokens = _TOKEN_RE.findall(smiles)
    return tokens if "".join(tokens) == smiles else None


# --------------------------------------------------------------------------- network
@dataclass
class VAEConfig:
    """Everything needed to rebuild the network (stored in config.json)."""

    vocab: list[str] = field(default_factory=list)
    embed: int = 64
    enc_hidden: int = 128
    dec_hidden: int = 256
    dec_layers: int = 1
    latent: int = 64
    cond_dim: int = COND_DIM
    max_len: int = 100  # tokens, without <bos>/<eos>


class MoleculeVAE(nn.Module):
    """Bi-GRU encoder, GRU decoder conditioned on ``[z, c]`` at its start and at every step."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        v = len(cfg.vocab)
        self.embed = nn.Embedding(v, cfg.embed, padding_idx=0)
        self.encoder = nn.GRU(cfg.embed, cfg.enc_hidden, batch_first=True, bidirectional=True)
        self.to_stats = nn.Linear(2 * cfg.enc_hidden + cfg.cond_dim, 2 * cfg.latent)
        self.to_h0 = nn.Linear(cfg.latent + cfg.cond_dim, cfg.dec_layers * cfg.dec_hidden)
        self.to_step = nn.Linear(cfg.latent + cfg.cond_dim, cfg.embed)
        self.decoder = nn.GRU(cfg.embed, cfg.dec_hidden, num_layers=cfg.dec_layers, batch_first=True)
        self.out = nn.Linear(cfg.dec_hidden, v)

    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor, cond: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens [B, T]`` (with <bos>/<eos>) -> ``mu, logvar [B, latent]``."""
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, h = self.encoder(packed)  # [2, B, H]
        mu, logvar = self.to_stats(torch.cat([h[0], h[1], cond], 1)).chunk(2, 1)
        return mu, logvar.clamp(-10, 10)

    def _h0(self, zc: torch.Tensor) -> torch.Tensor:
        b = zc.shape[0]
        return torch.tanh(self.to_h0(zc)).view(b, self.cfg.dec_layers, self.cfg.dec_hidden).transpose(0, 1).contiguous()

    def decode_logits(self, tokens: torch.Tensor, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits for ``tokens[:, 1:]`` given ``tokens[:, :-1]``."""
        zc = torch.cat([z, cond], 1)
        x = self.embed(tokens[:, :-1]) + self.to_step(zc)[:, None]
        y, _ = self.decoder(x, self._h0(zc))
        return self.out(y)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, cond: torch.Tensor, generator: torch.Generator,
               temperature: float = 1.0) -> torch.Tensor:
        """Autoregressive sampling -> token ids ``[B, <= max_len + 1]`` (EOS, then PAD).

        Finished rows leave the batch, so the cost follows the mean length, not the longest.
        Random draws come from ``generator`` (CPU) in a fixed order: reproducible from its seed.
        """
        b = z.shape[0]
        zc = torch.cat([z, cond], 1)
        step = self.to_step(zc)[:, None]
        h = self._h0(zc)
        never = [self.cfg.vocab.index(t) for t in (PAD, BOS, UNK)]
        eos = self.cfg.vocab.index(EOS)
        out = torch.zeros(b, self.cfg.max_len + 1, dtype=torch.long)
        active = torch.arange(b)
        tok = torch.full((b, 1), self.cfg.vocab.index(BOS), dtype=torch.long, device=z.device)
        t = 0
        for t in range(self.cfg.max_len + 1):
            y, h = self.decoder(self.embed(tok) + step, h)
            logits = self.out(y[:, 0]).float().cpu() / temperature
            logits[:, never] = -1e9
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
            out[active, t] = nxt
            keep = nxt != eos
            if not bool(keep.any()):
                break
            if not bool(keep.all()):
                idx = keep.nonzero()[:, 0]
                active, nxt, step = active[idx], nxt[idx], step[idx.to(z.device)]
                h = h[:, idx.to(z.device)].contiguous()
            tok = nxt[:, None].to(z.device)
        return out[:, :t + 1]
