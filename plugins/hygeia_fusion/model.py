"""The fusion network: MONAI ResNet image encoder + frozen text token states + co-attention.

Also the frozen text encoder's side (:func:`encode_texts`: token states and mask for a list of
texts; :func:`encoder_identity`: its name and weights' SHA-256, recorded in every bundle). MONAI
and the encoder are imported when first needed.

Shapes (batch ``B``, image tokens ``N = 16 * 16``, text tokens ``T``, width ``d``)::

    image [B,1,H,W] -> ResNet (MONAI) -> feature pyramid -> image tokens [B,N,d]
    text token states [B,T,384] (frozen all-MiniLM-L6-v2) -> linear -> text tokens [B,1+T,d]
        (a learned "no text" token is always first, so an image with no text still has a key)
    co-attention (x layers): image tokens attend to text tokens and text tokens to image tokens
    finding head:
        evidence maps  S = linear(image tokens)          [B,5,16,16]  (the heat maps; ``fine``: fused
                                                                  tokens upsampled + first-stage skip;
                                                                  ``finer``: + a stem skip, half the input size;
                                                                  ``refine``: + a small residual conv head)
        image logit    s_k = LSE-pool(S_k, r_k)          [B,5]        (log-sum-exp pooling)
        text logit     u_k = w_k . attn(q_k, text tokens) [B,5]        (one query per finding)
        logit_k = s_k + u_k + b_k
    localiser (optional, ``localise`` = a finding's index): a MONAI UNet on the image alone whose
        output, average-pooled to the map grid, replaces that finding's evidence map in ``maps``
        (not in s_k): where the finding lies, given that it is present (hygeia_fusion._localiser)

Without text only the "no text" token is present: ``u_k`` is then a learned constant and the
model is a pure image classifier whose evidence maps are its class activation maps.
"""
from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hygeia.errors import InputError

TEXT_DIM = 384  # all-MiniLM-L6-v2 hidden size
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"

ARCH_DEFAULTS: dict[str, Any] = {
    "width": 64, "heads": 4, "layers": 1, "widths": [16, 32, 64, 128], "blocks": [2, 2, 2, 2], "stem": 7,
    "mean": 0.5, "std": 0.25, "grid": 16, "pool": True, "fine": True, "finer": False,
    "refine": 0,
}
"""The trainers' network: the ``cxr`` diagnoser's backbone layout at a quarter of its width (MONAI
ResNet, 7x7 stem, 2-2-2-2 basic blocks of 16-128 channels, its input normalisation), 16x16
co-attention grid, evidence maps at a quarter of the input size."""


def arch_config(o: dict[str, Any], n_findings: int) -> dict[str, Any]:
    """The network config a bundle records (``architecture``; ``FusionNet(**config)``), from trainer options."""
    if int(o["refine"]) < 0:
        raise InputError("option refine", "0 (no conv head) or a number of channels", got=repr(o["refine"]))
    return {"n_findings": n_findings, "width": int(o["width"]), "heads": int(o["heads"]), "layers": int(o["layers"]),
            "widths": [int(w) for w in o["widths"]], "grid": int(o["grid"]), "pool": bool(o["pool"]),
            "fine": bool(o["fine"]), "finer": bool(o["finer"]), "refine": int(o["refine"]), "dropout": 0.0,
            "blocks": [int(b) for b in o["blocks"]], "stem": int(o["stem"]), "mean": float(o["mean"]), "std": float(o["std"])}


class CoAttentionBlock(nn.Module):
    """One bidirectional co-attention layer (ViLBERT-style), pre-norm, with residual FFNs."""

    def __init__(self, d: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ni, self.nt = nn.LayerNorm(d), nn.LayerNorm(d)
        self.i2t = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.t2i = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.fi = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.ft = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor, t: torch.Tensor, t_pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xi, tt = self.ni(x), self.nt(t)
        x2 = x + self.i2t(xi, tt, tt, key_padding_mask=t_pad, need_weights=False)[0]
        t2 = t + self.t2i(tt, xi, xi, need_weights=False)[0]
        return x2 + self.fi(x2), t2 + self.ft(t2)


class FusionNet(nn.Module):
    """Vision encoder + language token projection + co-attention + multi-label finding head."""

    def __init__(
        self,
        n_findings: int = 5,
        width: int = 64,
        heads: int = 4,
        layers: int = 1,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        text_dim: int = TEXT_DIM,
        grid: int = 16,
        dropout: float = 0.0,
        pool: bool = False,
        fine: bool = False,
        finer: bool = False,
        refine: int = 0,
        blocks: tuple[int, ...] = (1, 1, 1, 1),
        stem: int = 3,
        mean: float = 0.0,
        std: float = 1.0,
        localise: int = -1,
        localiser_channels: Sequence[int] = (),
    ) -> None:
        super().__init__()
        from monai.networks.nets import ResNet

        self.n_findings, self.grid, self.pool = n_findings, grid, pool
        self.mean, self.std = float(mean), float(std)  # input normalisation (the ``cxr``'s: 0.5, 0.25)
        # MONAI ResNet as the vision encoder: ``stem``x``stem`` stride-2 stem (+ max-pool if ``pool``), then
        # four stages of ``blocks`` basic blocks: at 64 px 32, 16, 8, 4 px maps (16, 8, 4, 2 with the pool)
        self.backbone = ResNet("basic", list(blocks), list(widths), spatial_dims=2, n_input_channels=1,
                               conv1_t_size=stem, conv1_t_stride=2, no_max_pool=not pool, feed_forward=False)
        self.lat = nn.ModuleList([nn.Conv2d(c, width, 1) for c in (widths if pool else widths[1:])])
        self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.pos = nn.Parameter(torch.zeros(1, grid * grid, width))
        nn.init.normal_(self.pos, std=0.02)
        self.text_proj = nn.Sequential(nn.Linear(text_dim, width), nn.LayerNorm(width))
        self.null_text = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.null_text, std=0.02)
        self.blocks = nn.ModuleList([CoAttentionBlock(width, heads, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.fine = fine
        if fine:  # evidence maps at the first stage's resolution: fused tokens upsampled + a skip
            self.fine_lat = nn.Conv2d(widths[0], width, 1)
            self.fine_norm = nn.LayerNorm(width)
        self.finer = bool(finer and fine and pool)
        if self.finer:  # one more step up, to the stem's resolution (half the input size): a skip from the stem
            self.finer_lat = nn.Conv2d(widths[0], width, 1)
            self.finer_norm = nn.LayerNorm(width)
        self.evidence = nn.Linear(width, n_findings)  # per-location logit for each finding
        self.refine = None
        if refine:  # a local conv head on the map grid, added to the linear read-out (starts at zero)
            self.refine = nn.Sequential(nn.Conv2d(width, refine, 1), nn.ReLU(), nn.Conv2d(refine, refine, 3, padding=1),
                                        nn.ReLU(), nn.Conv2d(refine, n_findings, 3, padding=1))
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)
        self.log_r = nn.Parameter(torch.full((n_findings,), math.log(4.0)))  # LSE sharpness per finding
        self.queries = nn.Parameter(torch.randn(1, n_findings, width) * 0.02)
        self.q_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.tnorm = nn.LayerNorm(width)
        self.text_w = nn.Parameter(torch.zeros(n_findings, width))
        self.bias = nn.Parameter(torch.zeros(n_findings))
        self.drop = nn.Dropout(dropout)
        self.localise = int(localise)
        self.localiser = localiser_net(localiser_channels) if self.localise >= 0 else None

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self._image_tokens(images)[0]

    def _image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.backbone
        if self.mean != 0.0 or self.std != 1.0:
            images = (images - self.mean) / self.std
        x0 = x = b.act(b.bn1(b.conv1(images)))
        if self.pool:
            x = b.maxpool(x)
        f1 = b.layer1(x)
        f2 = b.layer2(f1)
        f3 = b.layer3(f2)
        f4 = b.layer4(f3)
        g = (self.grid, self.grid)
        feats = (f1, f2, f3, f4) if self.pool else (f2, f3, f4)
        y = sum(F.interpolate(lat(f), size=g, mode="bilinear", align_corners=False) if f.shape[-1] != g[1] else lat(f)
                for lat, f in zip(self.lat, feats))
        y = self.smooth(y)
        return y.flatten(2).transpose(1, 2) + self.pos, f1, x0  # [B, N, d], first-stage and stem features

    def text_tokens(self, states: torch.Tensor | None, mask: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 1+T, d] tokens (the no-text token first) and their padding mask (True = ignore)."""
        null = self.null_text.expand(batch, 1, -1)
        if states is None:
            return null, torch.zeros(batch, 1, dtype=torch.bool, device=null.device)
        t = self.text_proj(states.to(null.dtype))
        pad = ~(mask.bool())
        return torch.cat([null, t], 1), torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=null.device), pad], 1)

    def forward(self, images: torch.Tensor, states: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> dict[str, Any]:
        """``images`` [B,1,H,W]; ``states`` [B,T,384] frozen text token states (or None); ``mask`` [B,T]."""
        bsz = images.shape[0]
        x, f1, x0 = self._image_tokens(images)
        t, t_pad = self.text_tokens(states, mask, bsz)
        for blk in self.blocks:
            x, t = blk(x, t, t_pad)
        x = self.norm(x)
        side = self.grid
        if self.fine:
            side = f1.shape[-1]
            grid = x.transpose(1, 2).reshape(bsz, -1, self.grid, self.grid)
            up = F.interpolate(grid, size=f1.shape[-2:], mode="bilinear", align_corners=False) + self.fine_lat(f1)
            x = self.fine_norm(up.flatten(2).transpose(1, 2))
            if self.finer:
                side = x0.shape[-1]
                grid = x.transpose(1, 2).reshape(bsz, -1, f1.shape[-2], f1.shape[-1])
                up = F.interpolate(grid, size=x0.shape[-2:], mode="bilinear", align_corners=False) + self.finer_lat(x0)
                x = self.finer_norm(up.flatten(2).transpose(1, 2))
        s_map = self.evidence(self.drop(x))  # [B, N, 5]
        if self.refine is not None:  # x is [B, side*side, d] on the map grid
            s_map = s_map + self.refine(x.transpose(1, 2).reshape(bsz, -1, side, side)).flatten(2).transpose(1, 2)
        r = self.log_r.exp()
        n = s_map.shape[1]
        s_img = (torch.logsumexp(s_map * r, dim=1) - math.log(n)) / r  # [B, 5]
        q = self.queries.expand(bsz, -1, -1)
        tq = self.q_attn(q, t, t, key_padding_mask=t_pad, need_weights=False)[0]
        u = (self.tnorm(tq) * self.text_w).sum(-1)  # [B, 5]
        logits = s_img + u + self.bias
        maps = s_map.transpose(1, 2).reshape(bsz, self.n_findings, side, side)
        if self.localiser is not None:
            k = self.localise
            maps = torch.cat([maps[:, :k], self.localise_map(images, side), maps[:, k + 1:]], 1)
        return {"logits": logits, "maps": maps, "image_logits": s_img, "text_logits": u}

    def localise_map(self, images: torch.Tensor, side: int) -> torch.Tensor:
        """The localiser's logits ``[B, 1, side, side]`` (average-pooled from the input size)."""
        y = self.localiser((images - self.mean) / self.std)
        return F.avg_pool2d(y, y.shape[-1] // side) if y.shape[-1] != side else y


def localiser_net(channels: Sequence[int]) -> nn.Module:
    """The localiser: a 2-D MONAI UNet, one input and one output channel, stride 2 per level, BatchNorm
    (an affine map at inference, so the compiled graphs agree with eager even on a blank image)."""
    from monai.networks.nets import UNet

    ch = tuple(int(c) for c in channels)
    if len(ch) < 2 or min(ch) < 1:
        raise InputError("localiser channels", "two or more positive channel counts, e.g. [8, 16, 32, 64, 128]",
                         got=repr(list(channels)))
    return UNet(2, 1, 1, channels=ch, strides=(2,) * (len(ch) - 1), num_res_units=1, norm="batch")


@functools.lru_cache(maxsize=4)
def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encoder_identity() -> dict[str, str]:
    """Name, folder and SHA-256 of the frozen text encoder's weights (recorded in the bundle)."""
    from hygeia.text import encoder_path

    p = encoder_path()
    return {"name": ENCODER_NAME, "sha256": _file_sha256(str(p / "model.safetensors")), "path": str(p)}


def encode_texts(texts: Sequence[str], max_tokens: int = 128, batch: int = 64,
                 name: str = "texts") -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen token states ``[B, T, 384]`` (float32) and attention mask ``[B, T]`` for ``texts``.

    An empty string is "no text" for that image (all-zero mask: only the learned no-text token is
    attended to). Text longer than ``max_tokens`` tokens is truncated with a warning.
    """
    from hygeia.text import load_encoder, tokenize

    _, model = load_encoder()
    texts = list(texts)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        tok = tokenize(texts, max_tokens=max_tokens, name=name)  # warns (once per call) on truncation
    lengths = tok.attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True)  # batches of similar length: little padding
    hidden = torch.zeros(len(texts), tok.input_ids.shape[1], model.config.hidden_size)
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            j = order[i:i + batch]
            t = int(lengths[j].max())
            ids, am = tok.input_ids[j, :t], tok.attention_mask[j, :t]
            hidden[j, :t] = model(input_ids=ids, attention_mask=am).last_hidden_state.float()
    mask = tok.attention_mask.clone()
    for i, t in enumerate(texts):
        if not t.strip():
            mask[i] = 0
    return hidden, mask


def warm_start(net: FusionNet, init: str | Any, progress: bool = False) -> int:
    """Copy every tensor of the bundle ``init`` whose name and shape fit ``net``; returns how many.
    An image-only diagnoser's bundle (``net.*``: a MONAI ResNet, as ``cxr`` ships) warm-starts the backbone."""
    from hygeia.bundles import load_bundle

    have = net.state_dict()
    init_t = load_bundle(init).tensors
    if any(k.startswith("net.") for k in init_t) and not any(k.startswith("backbone.") for k in init_t):
        init_t = {"backbone." + k[len("net."):]: v for k, v in init_t.items() if k.startswith("net.")}
    tensors = {k: v for k, v in init_t.items() if k in have and have[k].shape == v.shape}
    k = next((k for k, v in init_t.items() if k.startswith("backbone.") and k in have and have[k].shape != v.shape), None)
    if k is not None:  # a backbone of other widths would silently train from scratch
        raise InputError(f"--init bundle {str(init)!r}", "an image backbone with this network's layout (--option widths=...)",
                         got=f"{k} of shape {tuple(init_t[k].shape)}, the network's {tuple(have[k].shape)}")
    net.load_state_dict(tensors, strict=False)
    if progress:
        print(f"warm start from {init}: {len(tensors)}/{len(have)} tensors")
    return len(tensors)
