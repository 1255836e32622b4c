"""The ``vae``'s label priors ``p(z | c)`` over flat latents: fitting and sampling (split out of
:mod:`hygeia_vae.plugin` and :mod:`hygeia_vae.train`, which both use it).

One prior per label of :data:`hygeia.vocab.CONDITION_LABELS`, then a pooled one for
``condition=None``, fitted to the posterior means of that label's training images:

- ``pca-gmm`` (the default): a Gaussian mixture (full covariances, scikit-learn) in the label's
  top principal directions ("ex-post density estimation", Ghosh et al. 2020). Tensors ``mean``,
  ``basis``, ``gmm_weights``, ``gmm_means``, ``gmm_chol``.
- ``gaussian``: one low-rank-plus-diagonal Gaussian (the class mean, the top ``rank`` principal
  directions with their standard deviations, and a per-dimension residual). Tensors ``mean``,
  ``components``, ``scales``, ``residual``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from hygeia.vocab import CONDITION_LABELS


def sample_prior(prior: dict[str, torch.Tensor], row: int, n: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
    """:func:`hygeia_vae._sampling.sample_prior` (numpy, what sampling uses) for a prior held as
    tensors: ``n`` flat latents ``[n, D]`` on the prior's device."""
    from ._sampling import sample_prior as draw

    arrays = {k: v.detach().cpu().numpy() for k, v in prior.items()}
    return torch.from_numpy(draw(arrays, row, n, seed, temperature)).to(prior["mean"].device)


def fit_gmm_prior(latents: torch.Tensor, pcs: int, components: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Gaussian mixture (scikit-learn, full covariances) in the top ``pcs`` principal directions of
    flat latents ``[N, D]`` ("ex-post density estimation", Ghosh et al. 2020)."""
    from sklearn.mixture import GaussianMixture

    x = latents.double()
    mean = x.mean(0)
    xc = x - mean
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    basis = vh[:pcs].T  # [D, pcs]
    gm = GaussianMixture(components, covariance_type="full", reg_covar=1e-4, random_state=seed)
    gm.fit((xc @ basis).numpy())
    return {"mean": mean.float(), "basis": basis.float(), "gmm_weights": torch.from_numpy(gm.weights_).float(),
            "gmm_means": torch.from_numpy(gm.means_).float(),
            "gmm_chol": torch.from_numpy(np.linalg.cholesky(gm.covariances_)).float()}


def fit_prior(latents: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """Low-rank-plus-diagonal Gaussian fitted to flat latents ``[N, D]``."""
    x = latents.double()
    mean = x.mean(0)
    xc = x - mean
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    k = min(rank, vh.shape[0])
    scales = s[:k] / math.sqrt(max(x.shape[0] - 1, 1))
    comps = vh[:k].T  # [D, k]
    explained = (comps * scales).pow(2).sum(1)
    resid = (xc.var(0) - explained).clamp_min(1e-8).sqrt()
    if k < rank:  # fewer samples than the rank: pad with zero-variance directions
        comps = torch.cat([comps, comps.new_zeros(comps.shape[0], rank - k)], 1)
        scales = torch.cat([scales, scales.new_zeros(rank - k)])
    return {"mean": mean.float(), "components": comps.float(), "scales": scales.float(), "residual": resid.float()}


def fit_priors(flat: torch.Tensor, conds: torch.Tensor, rank: int, kind: str = "gaussian", pcs: int = 96,
               components: int = 30, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prior per label, then the pooled one (rows of :data:`hygeia_vae.model.PRIORS`), stacked."""
    groups = [flat[conds == k] for k in range(len(CONDITION_LABELS))] + [flat]
    if kind == "pca-gmm":  # one shape for every row: bounded by the smallest group (tiny test runs)
        smallest = min(len(x) for x in groups)
        k, m = max(1, min(pcs, smallest // 2)), max(1, min(components, smallest // 4))
        parts = [fit_gmm_prior(x, k, m, seed) for x in groups]
    else:
        parts = [fit_prior(x, rank) for x in groups]
    return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
