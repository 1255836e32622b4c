"""``molecule-vae``: a conditional SMILES VAE trained on MOSES (the network: :mod:`hygeia_molvae.model`).

``generate(n, condition=None | {"logP": 2.5, ...}, seed=0)`` draws ``z ~ N(0, I)`` and decodes
it autoregressively under the ``property`` conditioner's vector for ``condition`` (properties
left out are "don't care"). Invalid SMILES are returned with ``valid=False``; RDKit work goes
through :mod:`hygeia.chem`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from hygeia import tensors
from hygeia.api import GeneratedMolecule, ModelCard, ModelIdentity, PluginSpec
from hygeia.bundles import load_bundle, pick_device, save_bundle
from hygeia.errors import BundleError, InputError
from hygeia.validation import check_condition, check_n, check_seed

from ._bundle import NAME, VERSION, WEIGHTS, make_card
from .model import COND_DIM, EOS, PRECISIONS, MoleculeVAE, VAEConfig, default_precision


class MoleculeVAEGenerator:
    """``generate(n, condition=None | {"logP": 2.5, ...}, seed=0) -> list[GeneratedMolecule]``."""

    output = "molecule"
    condition_kinds = frozenset({"none", "properties"})
    max_n = 100_000

    def __init__(self, bundle: str | Path | None = None, device: str | None = None) -> None:
        path = Path(bundle) if bundle else WEIGHTS
        b = load_bundle(path, device="cpu")
        try:
            self.cfg = VAEConfig(**b.config["model"])
        except (KeyError, TypeError) as exc:
            raise BundleError(f"model bundle {path}: config.json lacks a valid 'model' section: {exc}") from exc
        self.device = pick_device(device)
        self.model = MoleculeVAE(self.cfg)
        self.model.load_state_dict(b.tensors)
        self.model.to(self.device).eval()
        self.identity = ModelIdentity(NAME, VERSION, "generator", b.sha256)
        self.card = b.card
        self.config = b.config
        from hygeia.plugins import get_registry

        self.conditioner = get_registry().create("conditioner", "property", device=str(self.device))

    def _conditions(self, n: int, condition: Any) -> torch.Tensor:
        kind = check_condition(condition, self.condition_kinds, NAME)
        if kind == "none":
            return torch.zeros(n, COND_DIM, device=self.device)
        return self.conditioner.encode([condition]).to(self.device).expand(n, -1)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids -> SMILES strings (stopping at EOS)."""
        vocab, eos = self.cfg.vocab, self.cfg.vocab.index(EOS)
        out = []
        for row in ids.tolist():
            chars = []
            for i in row:
                if i == eos or i == 0:
                    break
                chars.append(vocab[i])
            out.append("".join(chars))
        return out

    def export_module(self) -> None:
        """No compiled execution (:mod:`hygeia.compiled`): sampling is an autoregressive loop of
        single GRU steps whose rows leave the batch as they finish, so there is no one graph to
        export; the model stays eager."""
        return None

    def generate(self, n: int, condition: Any = None, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None, batch_size: int = 2048,
                 temperature: float | None = None, properties: bool = False, precision: str | None = None,
                 syntax: bool = False, retries: int | None = None, **options: Any) -> list[GeneratedMolecule]:
        """Sample ``n`` molecules from the prior; the same ``seed`` gives the same molecules (at the
        same ``precision``).

        ``temperature``: softmax temperature (default: the bundle's ``sampling.temperature``,
        chosen on held-out training molecules); ``properties=True`` also fills each valid
        molecule's logP/QED/SA/MW (slower); ``precision``: of the decoder's hidden-state product,
        ``"float32"`` or ``"bfloat16"`` (default: :func:`default_precision` for the device);
        ``syntax``: draw only tokens that keep the SMILES parseable (default False: see the plugin page);
        ``retries``: decode an invalid sample again from the same latent and condition, up to this
        many times (default: the bundle's ``sampling.retries``, else 0: every sample drawn once).
        """
        sampling = self.config.get("sampling", {})
        if temperature is None:
            temperature = float(sampling.get("temperature", 1.0))
        if retries is None:
            retries = int(sampling.get("retries", 0))
        if options:
            raise InputError("options", "batch_size, temperature, properties, precision, syntax or retries",
                             got=", ".join(options))
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
            raise InputError("retries", "a whole number in [0, 20]", got=repr(retries))
        precision = default_precision(self.device) if precision is None else precision
        if precision not in PRECISIONS:
            raise InputError("precision", " or ".join(PRECISIONS), got=repr(precision))
        if not isinstance(syntax, bool):
            raise InputError("syntax", "true or false", got=repr(syntax))
        n, seed = check_n(n, self.max_n), check_seed(seed)
        if not (isinstance(temperature, (int, float)) and 0.05 <= temperature <= 5):
            raise InputError("temperature", "a number in [0.05, 5]", got=repr(temperature))
        cond = self._conditions(n, condition)
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.cfg.latent, generator=g).to(self.device)
        from rdkit import Chem

        from hygeia.chem import molecular_properties, valid_smiles

        def draw(rows: torch.Tensor, report: bool = False) -> list[str]:
            smiles: list[str] = []
            for start in range(0, len(rows), batch_size):
                part = rows[start:start + batch_size].to(self.device)
                smiles += self.decode(self.model.sample(z[part], cond[part], g, temperature, precision, syntax))
                if report and progress is not None:
                    progress(len(smiles), n)
            return smiles

        smiles = draw(torch.arange(n), report=True)
        valid = valid_smiles(smiles)
        for _ in range(retries):  # invalid samples, decoded again from their own latent and condition
            again = [i for i, ok in enumerate(valid) if not ok]
            if not again:
                break
            redrawn = draw(torch.tensor(again))
            for i, s, ok in zip(again, redrawn, valid_smiles(redrawn)):
                if ok:
                    smiles[i], valid[i] = s, True
        out = []
        for s, ok in zip(smiles, valid):
            mol = Chem.MolFromSmiles(s) if (ok and properties) else None
            try:
                props = molecular_properties(mol) if mol is not None else {}
            except InputError:  # valid, but RDKit cannot compute its properties (hygeia.chem)
                props = {}
            out.append(GeneratedMolecule(s, ok, seed, condition, self.identity, props))
        return out


def _shipped_card() -> ModelCard:
    """The model card of the shipped weights (with their measured metrics), if present."""
    try:
        return ModelCard.from_dict(json.loads((WEIGHTS / "model_card.json").read_text()))
    except (OSError, ValueError, TypeError):
        return make_card({}, "MOSES training set (molsets 0.3.1)")


def update_card_metrics(bundle: str | Path, metrics: dict[str, Any] | None = None,
                        sampling: dict[str, Any] | None = None) -> None:
    """Merge measured ``metrics`` into a bundle's model card and ``sampling`` defaults
    (e.g. ``{"temperature": 0.8}``) into its config; the weights stay unchanged."""
    b = load_bundle(bundle)
    card = ModelCard.from_dict({**b.card.to_dict(), "metrics": {**dict(b.card.metrics), **(metrics or {})}})
    config = {**b.config, "sampling": {**b.config.get("sampling", {}), **(sampling or {})}}
    save_bundle(bundle, b.tensors, config, card)


SPEC = PluginSpec(
    kind="generator",
    name=NAME,
    version=VERSION,
    description="Conditional SMILES VAE (GRU, free-bits KL) trained on MOSES; logP/QED/SA/MW targets",
    factory=MoleculeVAEGenerator,
    **tensors.generator("molecule"),
    model_card=_shipped_card(),
    train="hygeia_molvae.train:train",
)
