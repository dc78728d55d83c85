"""Known, smooth deformations for validation and demos: breathing-like motion plus local bumps.

Used by the registration benchmark and by the end-to-end pipeline to give a simulated PET a realistic, *known*
misalignment against its CT (as real PET/CT has, from breathing), so the recovered deformation can be scored.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def known_deformation(ref: sitk.Image, body: np.ndarray, amp_si: float = 10.0, amp_ap: float = 4.0, bumps: int = 4,
                      bump_amp: float = 6.0, bump_sigma: float = 30.0, seed: int = 0) -> np.ndarray:
    """Smooth pull-back field (LPS mm, array (*spatial, 3)) on the grid of ``ref``: breathing-like + bumps.

    Superior-inferior motion strongest in the upper body (diaphragm), anterior-posterior expansion, and
    ``bumps`` Gaussian bumps of ``bump_amp`` mm at random points of ``body`` (numpy mask on ``ref``'s grid).
    """
    rng = np.random.default_rng(seed)
    shape = sitk.GetArrayViewFromImage(ref).shape
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")[::-1], -1).astype(np.float64)
    D = np.asarray(ref.GetDirection()).reshape(3, 3)
    x = np.asarray(ref.GetOrigin()) + (idx * np.asarray(ref.GetSpacing())) @ D.T
    pts = x[body > 0]
    lo, hi = pts.min(0), pts.max(0)
    c, r = (lo + hi) / 2, np.maximum((hi - lo) / 2, 1e-6)
    q = (x - c) / r                                              # about -1..1 inside the body
    w_si = np.exp(-0.5 * ((q[..., 2] - 0.3) / 0.6) ** 2)        # strongest in the upper part (diaphragm)
    w_lat = np.exp(-0.5 * (q[..., 0] ** 2 + q[..., 1] ** 2) / 0.8 ** 2)
    u = np.zeros_like(x)
    u[..., 2] = amp_si * w_si * w_lat                            # superior-inferior
    u[..., 1] = amp_ap * q[..., 1] * w_si * w_lat                # anterior-posterior expansion
    inside = np.argwhere(body > 0)
    for _ in range(bumps):
        p = x[tuple(inside[rng.integers(len(inside))])]
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        g = np.exp(-0.5 * np.sum((x - p) ** 2, -1) / bump_sigma ** 2)
        u += bump_amp * g[..., None] * d
    return u


def field_image(u: np.ndarray, ref: sitk.Image) -> sitk.Image:
    """numpy field (*spatial, 3) -> SimpleITK vector image on ``ref``'s grid."""
    img = sitk.GetImageFromArray(u.astype(np.float64), isVector=True)
    img.CopyInformation(ref)
    return img


def warp_with(img: sitk.Image, u: np.ndarray, ref: sitk.Image, label: bool = False,
              default: float | None = None) -> sitk.Image:
    """Resample ``img`` through the pull-back field ``u`` (on ``ref``): out(x) = img(x + u(x))."""
    tx = sitk.DisplacementFieldTransform(field_image(u, ref))
    if default is None:
        default = 0.0 if label else float(sitk.GetArrayViewFromImage(img).min())
    return sitk.Resample(img, ref, tx, sitk.sitkNearestNeighbor if label else sitk.sitkLinear, default,
                         img.GetPixelID())


def body_mask(ct: sitk.Image, thr: float = -500) -> np.ndarray:
    """Largest connected component above ``thr`` HU, holes filled: the patient's body on a CT."""
    from scipy import ndimage
    a = sitk.GetArrayFromImage(ct) > thr
    lab, n = ndimage.label(a)
    if n > 1:
        sizes = ndimage.sum(a, lab, range(1, n + 1))
        a = lab == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(a)
