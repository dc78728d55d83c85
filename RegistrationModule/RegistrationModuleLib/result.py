"""Registration result: displacement field (fixed grid, LPS mm, ``x_moving = x_fixed + u(x_fixed)``)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from PETWorkbenchLib.errors import InputError


def jacobian_array(field: sitk.Image) -> np.ndarray:
    """Jacobian determinant (numpy, array order) of a SimpleITK displacement field in LPS mm.

    With ``G[c, d] = d u_c / d s_d`` (LPS component c, index axis d in mm) and the direction matrix D, the
    Jacobian of ``x -> x + u`` is ``I + G Dᵀ``, and ``det(I + G Dᵀ) = det(D + G) · det(D)``.
    """
    nd = field.GetDimension()
    u = sitk.GetArrayViewFromImage(field)                          # (*spatial, nd) LPS
    D = np.asarray(field.GetDirection()).reshape(nd, nd)
    sp = np.asarray(field.GetSpacing())
    A = [[None] * nd for _ in range(nd)]
    for c in range(nd):
        uc = np.asarray(u[..., c], dtype=np.float64)
        for d in range(nd):
            ax = nd - 1 - d
            g = np.gradient(uc, sp[d], axis=ax) if uc.shape[ax] > 1 else np.zeros_like(uc)
            A[c][d] = g + D[c, d]
    if nd == 2:
        det = A[0][0] * A[1][1] - A[0][1] * A[1][0]
    else:
        det = (A[0][0] * (A[1][1] * A[2][2] - A[1][2] * A[2][1])
               - A[0][1] * (A[1][0] * A[2][2] - A[1][2] * A[2][0])
               + A[0][2] * (A[1][0] * A[2][1] - A[1][1] * A[2][0]))
    return det * float(np.linalg.det(D))


def jacobian_stats(det: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Folding percentage (|J| <= 0) and std(log J) over ``mask`` (or everywhere)."""
    vals = det[mask > 0] if mask is not None else det.ravel()
    if vals.size == 0:
        raise InputError("the mask for Jacobian statistics is empty")
    fold = float(np.mean(vals <= 0) * 100.0)
    logj = np.log(np.clip(vals, 1e-9, None))
    return {"folding_pct": round(fold, 5), "std_log_j": round(float(np.std(logj)), 5),
            "jacobian_min": round(float(vals.min()), 5), "jacobian_max": round(float(vals.max()), 5)}


class RegistrationResult:
    """Output of :func:`register`.

    Attributes: ``displacement`` (SimpleITK vector image, float64, fixed grid, LPS mm, pull-back convention),
    ``affine`` (the pre-alignment, fixed->moving, already contained in ``displacement``), ``summary`` (dict).
    """

    def __init__(self, displacement, fixed=None, affine=None, summary=None):
        if displacement.GetNumberOfComponentsPerPixel() != displacement.GetDimension():
            raise InputError("a displacement field needs one vector component per dimension, got "
                             f"{displacement.GetNumberOfComponentsPerPixel()} for a "
                             f"{displacement.GetDimension()}D image")
        self.displacement = sitk.Cast(displacement, sitk.sitkVectorFloat64)
        self.fixed = fixed
        self.affine = affine
        self.summary = dict(summary or {})

    # ---- transforms
    def transform(self):
        """``sitk.DisplacementFieldTransform`` (fixed -> moving points), a copy of the field."""
        return sitk.DisplacementFieldTransform(sitk.Image(self.displacement))

    def transform_points(self, points):
        """Map fixed-space physical points (N, ndim) to moving space: ``x + u(x)`` (linear interpolation)."""
        tx = self.transform()
        return np.array([tx.TransformPoint([float(v) for v in p]) for p in np.asarray(points, float)])

    def warp(self, moving_image, is_label=False, default_value=None, reference=None):
        """Resample ``moving_image`` onto the fixed grid (or ``reference``) through the field."""
        if moving_image.GetDimension() != self.displacement.GetDimension():
            raise InputError(f"cannot warp a {moving_image.GetDimension()}D image with a "
                             f"{self.displacement.GetDimension()}D displacement field")
        ref = reference if reference is not None else self.displacement
        if default_value is None:
            default_value = 0.0 if is_label else float(sitk.GetArrayViewFromImage(moving_image).min())
        interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
        out = sitk.Resample(moving_image, ref, self.transform(), interp, default_value,
                            moving_image.GetPixelID())
        return out

    # ---- quality
    def jacobian_determinant(self):
        """Jacobian determinant of ``x -> x + u(x)`` as a float32 image on the fixed grid."""
        img = sitk.GetImageFromArray(jacobian_array(self.displacement).astype(np.float32))
        img.CopyInformation(self.displacement)
        return img

    def jacobian_stats(self, mask=None):
        m = sitk.GetArrayFromImage(mask) if isinstance(mask, sitk.Image) else mask
        return jacobian_stats(jacobian_array(self.displacement), m)

    def save(self, path, **kw):
        """Write the displacement field (verified, atomic; ``kw`` as :func:`PETWorkbenchLib.imageio.write_image`)."""
        from PETWorkbenchLib.imageio import write_image
        return write_image(self.displacement, path, **kw)
