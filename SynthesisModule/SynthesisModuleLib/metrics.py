"""Metrics of the DRMC paper: PSNR, SSIM, lesion SUVmean / SUVmax bias, centre interference I_ij, routing plot.

* PSNR = 10 log10(R^2 / MSE) with R = maximum of the full-dose (reference) volume, over the whole 2 mm volume.
* SSIM: 3D SSIM (Gaussian window sigma 1.5 voxels, K1 = 0.01, K2 = 0.03) with the same data range R.
* B_mean / B_max (as Zhou et al. 2020, ref. [3] of the paper): for each lesion l,
  |SUVmean_l(estimate) - SUVmean_l(full)| / SUVmean_l(full) and the same for SUVmax; averaged over lesions.
  Lesions are the connected components (26-connectivity) of the non-zero lesion mask, or its distinct label
  values when the mask is already instance-labelled.
* I_ij (supplement eq. 4-5): interference of centre j on centre i, first-order estimate from gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.metrics import psnr, ssim  # noqa: F401 - the engine's names for them

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    import torch

    from .data import CenterPatchSampler
    from .model import Generator


def _check_pair(pred, ref):
    pred = np.asarray(pred, np.float64)
    ref = np.asarray(ref, np.float64)
    if pred.shape != ref.shape:
        raise InputError(f"estimate shape {pred.shape} differs from reference shape {ref.shape}")
    return pred, ref


def lesion_components(lesions: np.ndarray) -> list[np.ndarray]:
    lesions = np.asarray(lesions)
    vals = np.unique(lesions[lesions > 0])
    if len(vals) > 1:  # already instance-labelled
        return [lesions == v for v in vals]
    lab, n = ndimage.label(lesions > 0, structure=np.ones((3, 3, 3)))
    return [lab == i for i in range(1, n + 1)]


def lesion_suv_errors(pred: np.ndarray, ref: np.ndarray, lesions: np.ndarray, min_voxels: int = 1
                      ) -> list[tuple[float, float]]:
    """Signed relative errors ((pred - ref) / ref) of SUVmean and SUVmax, one (mean, max) pair per lesion.

    Lesions are the connected components (or instance labels) of ``lesions``; lesions with fewer than
    ``min_voxels`` voxels or without uptake in the reference are skipped. Negative values mean the estimate
    under-states the lesion's uptake (lesion flattening)."""
    pred, ref = _check_pair(pred, ref)
    if np.shape(lesions) != ref.shape:
        raise InputError(f"lesion mask shape {np.shape(lesions)} differs from image shape {ref.shape}")
    errors = []
    for mask in lesion_components(lesions):
        if mask.sum() < min_voxels:
            continue
        rm, rx = ref[mask].mean(), ref[mask].max()
        if rm <= 0 or rx <= 0:
            continue
        errors.append(((pred[mask].mean() - rm) / rm, (pred[mask].max() - rx) / rx))
    return errors


def suv_bias_from_errors(errors: Sequence[tuple[float, float]]) -> tuple[float, float, int]:
    """(B_mean, B_max, n_lesions) from ``lesion_suv_errors``: mean relative absolute bias of SUVmean and SUVmax
    (DRMC's definition); NaN when no lesion is scoreable."""
    if not errors:
        return float("nan"), float("nan"), 0
    e = np.abs(np.asarray(errors, dtype=np.float64))
    return float(e[:, 0].mean()), float(e[:, 1].mean()), len(errors)


def lesion_suv_bias(pred: np.ndarray, ref: np.ndarray, lesions: np.ndarray, min_voxels: int = 1
                    ) -> tuple[float, float, int]:
    """(B_mean, B_max, n_lesions) of ``pred`` against ``ref`` over the lesions; see ``suv_bias_from_errors``."""
    return suv_bias_from_errors(lesion_suv_errors(pred, ref, lesions, min_voxels))


# ------------------------------------------------------------------------------------------- interference
def interference_batches(sampler: CenterPatchSampler, n_batches: int = 100, batch_size: int = 1, seed: int = 0
                         ) -> dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]]:
    """The batches :func:`interference` uses: for each centre, ``n_batches`` batches X_j that estimate the update
    direction d_j and ``n_batches`` other, independent batches X_i at which the loss change is evaluated
    (``{centre: {"direction": [(low, full), ...], "evaluate": [...]}}``, drawn reproducibly from ``seed``)."""
    out = {}
    for ci, c in enumerate(sampler.centers):
        out[c] = {role: [sampler.sample(c, batch_size, np.random.default_rng([seed, ci, r, k]))
                         for k in range(int(n_batches))]
                  for r, role in enumerate(("direction", "evaluate"))}
    return out


def interference(model: Generator, sampler: CenterPatchSampler, n_batches: int = 100, batch_size: int = 1,
                 param_prefixes: dict[str, str] | None = None, eps: float = 1e-3, seed: int = 0,
                 device: str | torch.device = "cpu", batches: dict | None = None) -> dict:
    """Centre interference I_ij (supplement eq. 4-5) for each parameter group.

    Definition: Delta_j L_i(X_i) = E_{X_j}[L_i(X_i; theta) - L_i(X_i; theta - lambda g_j(X_j) / ||g_j(X_j)||)] and
    I_ij = E_{X_i}[Delta_j L_i(X_i) / Delta_i L_i(X_i)], with g the loss gradient over the group's parameters.
    To first order in lambda, Delta_j L_i(X_i) = lambda d_j . g_i(X_i) with d_j = E_{X_j}[g_j / ||g_j||], so
    I_ij = E_{X_i}[(d_j . g_i(X_i)) / (d_i . g_i(X_i))] (lambda cancels). As the supplement, ``n_batches`` = 100
    batches per centre; d_i is estimated from batches drawn independently of the X_i it is evaluated at (the
    expectation over X_j in the definition is over fresh batches of centre i too), see :func:`interference_batches`
    (``batches`` may pass them in). Positive: j helps i; negative: j harms i.
    ``param_prefixes``: dict name -> parameter-name prefix (default: one group per block ``body.<b>.``).
    Returns {"centers": [...], "groups": {name: I matrix as nested lists}, "n_batches": n}.
    """
    import torch

    from .model import charbonnier_loss

    model = model.to(device).train()
    dtype = next(model.parameters()).dtype
    names = [n for n, _ in model.named_parameters()]
    if param_prefixes is None:
        param_prefixes = {f"block{b + 1}": f"body.{b}." for b in range(len(model.body))}
    groups = {g: [i for i, n in enumerate(names) if n.startswith(p)] for g, p in param_prefixes.items()}
    params = list(model.parameters())
    centers = sampler.centers
    if batches is None:
        batches = interference_batches(sampler, n_batches, batch_size, seed)

    def gradients(pairs):  # group -> (K, P) array of the loss gradients of the batches
        per = {g: [] for g in groups}
        for low, full in pairs:
            model.zero_grad(set_to_none=True)
            x = torch.as_tensor(low, dtype=dtype, device=device)
            y = torch.as_tensor(full, dtype=dtype, device=device)
            charbonnier_loss(model(x), y, eps).backward()
            for g, idx in groups.items():
                vec = torch.cat([params[i].grad.flatten() if params[i].grad is not None
                                 else torch.zeros(params[i].numel(), dtype=dtype, device=device) for i in idx])
                per[g].append(vec.detach().cpu().double().numpy())
        return {g: np.stack(v) for g, v in per.items()}

    direction = {c: gradients(batches[c]["direction"]) for c in centers}
    evaluate = {c: gradients(batches[c]["evaluate"]) for c in centers}
    model.zero_grad(set_to_none=True)
    out = {}
    for g in groups:
        d = {}
        for c in centers:
            gk = direction[c][g]
            norms = np.linalg.norm(gk, axis=1, keepdims=True)
            d[c] = (gk / np.where(norms > 0, norms, 1.0)).mean(0)
        mat = np.zeros((len(centers), len(centers)))
        for i, ci in enumerate(centers):
            denom = evaluate[ci][g] @ d[ci]
            for j, cj in enumerate(centers):
                num = evaluate[ci][g] @ d[cj]
                ok = np.abs(denom) > 0
                mat[i, j] = float(np.mean(num[ok] / denom[ok])) if ok.any() else float("nan")
        out[g] = mat.round(6).tolist()
    model.eval()
    return {"centers": centers, "groups": out, "n_batches": len(next(iter(batches.values()))["evaluate"])}


# ---------------------------------------------------------------------------------------------- routing plot
def routing_plot(summaries: dict, path: str | Path, title: str = "Top-1 expert per layer per centre") -> str:
    """PNG in the spirit of Fig. 3(b): for each centre, stacked bars of the top-1 expert fraction per bank.

    ``summaries``: centre -> routing summary (from ``infer.routing_summary``). Needs matplotlib (imported here).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centers = [c for c in summaries if summaries[c].get("routed")]
    if not centers:
        raise InputError("no routed model summaries to plot (the baseline has no routing)")
    banks = summaries[centers[0]]["banks"]
    m = len(summaries[centers[0]]["top1_fraction"][0])
    fig, axes = plt.subplots(1, len(centers), figsize=(2.2 + 1.6 * len(centers), 3.6), sharey=True, squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, c in zip(axes[0], centers):
        frac = np.array(summaries[c]["top1_fraction"])  # (banks, M)
        bottom = np.zeros(len(banks))
        for e in range(m):
            ax.barh(np.arange(len(banks)), frac[:, e], left=bottom, color=colors[e % 10], label=f"expert {e + 1}")
            bottom += frac[:, e]
        ax.set_title(c, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of patches", fontsize=8)
    axes[0][0].set_yticks(np.arange(len(banks)))
    axes[0][0].set_yticklabels(banks, fontsize=7)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
