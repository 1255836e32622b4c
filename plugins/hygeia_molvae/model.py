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


PRECISIONS = ("float32", "bfloat16")


def default_precision(device: torch.device | str) -> str:
    """``"bfloat16"`` on a CPU with native bfloat16 matrix products (oneDNN; AVX-512 BF16 or AMX),
    where it samples about twice as fast; ``"float32"`` elsewhere (GPUs are not bound by it)."""
    if torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
        except (AttributeError, RuntimeError):
            return "float32"
    return "float32"


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
               temperature: float = 1.0, precision: str = "float32", syntax: bool = False) -> torch.Tensor:
        """Autoregressive sampling -> token ids ``[B, <= max_len + 1]`` (EOS, then PAD).

        The decoder runs as :class:`DecoderSteps` (the GRU's equations with the input projection
        folded into a per-token table). ``precision="bfloat16"`` runs the hidden-state matrix
        product in bfloat16 (twice as fast on CPUs with native bfloat16; the state and gates stay
        float32). Finished rows write padding until an eighth of the batch has finished, then leave
        it, so the cost follows the mean length, not the longest. Random draws come from ``generator`` (CPU), one uniform number per row and step,
        in a fixed order: reproducible from its seed at a given precision. ``syntax=True`` draws
        only tokens that keep the SMILES parseable (:class:`~hygeia_molvae._syntax.SmilesSyntax`).
        """
        from ._syntax import SmilesSyntax

        b = z.shape[0]
        grammar = SmilesSyntax(self.cfg.vocab, EOS, b) if syntax else None
        steps = DecoderSteps(self, torch.cat([z, cond], 1), temperature, getattr(torch, precision))
        eos = self.cfg.vocab.index(EOS)
        out = torch.zeros(b, self.cfg.max_len + 1, dtype=torch.long)
        active = torch.arange(b)
        done = torch.zeros(b, dtype=torch.bool)  # finished rows stay (writing PAD) until an eighth are
        tok = torch.full((b,), self.cfg.vocab.index(BOS), dtype=torch.long, device=z.device)
        t = 0
        for t in range(self.cfg.max_len + 1):
            logits = steps(tok).float().cpu()
            if grammar is not None:
                logits.masked_fill_(grammar.forbidden(), -float("inf"))
            cdf = torch.softmax(logits, -1).cumsum_(1)
            u = torch.rand(len(cdf), 1, generator=generator)
            nxt = (cdf[:, :-1] < u * cdf[:, -1:]).sum(1).masked_fill_(done, 0)  # inverse-CDF draw
            out[active, t] = nxt
            if grammar is not None:
                grammar.update(nxt)
            done |= nxt == eos
            finished = int(done.sum())
            if finished == len(done):
                break
            if finished * 8 >= len(done):
                idx = (~done).nonzero()[:, 0]
                active, nxt, done = active[idx], nxt[idx], done[idx]
                steps.keep(idx.to(z.device))
                if grammar is not None:
                    grammar.keep(idx)
            tok = nxt.to(z.device)
        return out[:, :t + 1]


class DecoderSteps:
    """One GRU decoder step per call, from token ids to next-token logits (PyTorch's GRU equations).

    The first layer's input is ``embed(token) + to_step([z, c])``, so its input projection is a
    per-token table plus a per-row term computed once. ``tanh(x)`` is ``2 sigmoid(2x) - 1`` with the
    factor 2 folded into the weights (CPU ``sigmoid`` is several times faster than ``tanh``). The
    rows of the state follow the batch as rows leave it (:meth:`keep`).
    """

    def __init__(self, model: MoleculeVAE, zc: torch.Tensor, temperature: float, dtype: torch.dtype) -> None:
        d, hid = model.decoder, model.cfg.dec_hidden
        two = torch.ones(3 * hid, device=zc.device)
        two[2 * hid:] = 2.0  # the n gate's pre-activation is doubled: tanh(x) = 2 sigmoid(2x) - 1
        self.h = list(model._h0(zc).unbind(0))
        self.w_in, self.w_hh, self.b_hn = [], [], []
        for layer in range(model.cfg.dec_layers):
            w_ih, w_hh = getattr(d, f"weight_ih_l{layer}"), getattr(d, f"weight_hh_l{layer}")
            b_ih, b_hh = getattr(d, f"bias_ih_l{layer}"), getattr(d, f"bias_hh_l{layer}")
            bias = (b_ih + torch.cat([b_hh[:2 * hid], torch.zeros_like(b_hh[2 * hid:])])) * two
            self.w_in.append(((w_ih.T * two).contiguous(), bias))
            self.w_hh.append((w_hh.T * two).to(dtype).contiguous())
            self.b_hn.append(b_hh[2 * hid:] * 2)
        w0, bias0 = self.w_in[0]
        self.table = model.embed.weight @ w0  # [V, 3H]
        self.row = model.to_step(zc) @ w0 + bias0  # [B, 3H]
        self.w_out = (model.out.weight.T / temperature).contiguous()
        self.b_out = model.out.bias / temperature
        self.b_out[[model.cfg.vocab.index(t) for t in (PAD, BOS, UNK)]] = -float("inf")
        self.hid, self.dtype = hid, dtype

    def __call__(self, tok: torch.Tensor) -> torch.Tensor:
        hid, x = self.hid, None
        for layer, h in enumerate(self.h):
            if layer == 0:
                gi = self.table.index_select(0, tok).add_(self.row)
            else:
                gi = torch.addmm(self.w_in[layer][1], x, self.w_in[layer][0])
            gh = torch.mm(h.to(self.dtype), self.w_hh[layer])  # float32 + bfloat16 below: no cast pass
            rz = torch.sigmoid_(gi[:, :2 * hid].add_(gh[:, :2 * hid]))
            n = torch.sigmoid_(gi[:, 2 * hid:].addcmul_(rz[:, :hid], self.b_hn[layer] + gh[:, 2 * hid:]))
            x = self.h[layer] = torch.lerp(n.mul_(2).sub_(1), h, rz[:, hid:])
        return torch.addmm(self.b_out, x, self.w_out)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only the rows ``idx`` (rows whose molecules are finished leave)."""
        self.row = self.row.index_select(0, idx)
        self.h = [h.index_select(0, idx) for h in self.h]
