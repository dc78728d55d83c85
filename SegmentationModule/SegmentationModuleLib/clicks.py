"""Clicks for interactive segmentation: simulated clicks (training and benchmark) and the 2D crop a click is seen in.

``next_click`` is the RITM / iSegFormer protocol that PE-MED's evaluation follows (the next click goes to the
point farthest from the boundary of the larger error region: a positive click in a missed region, a negative one
in a false region), used in training (PE-MED's iterative click simulation) and in ``benchmarks/interactive.py``.

``SliceCrop`` maps one axial slice of a volume to the fixed square grid the 2D network sees: ``size`` pixels of
``pixel_mm`` around a centre, bilinear for images, nearest for masks; ``paste`` brings a crop-grid map back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from collections.abc import Sequence


def _inner_distance(mask: np.ndarray, spacing: Sequence[float] | None) -> np.ndarray:
    """Distance of every voxel of ``mask`` to the nearest voxel outside it, the image border counting as outside
    (computed in the mask's bounding box: every voxel beyond it is outside, and so is the box's padding)."""
    out = np.zeros(mask.shape, float)
    if not mask.any():
        return out
    idx = np.argwhere(mask)
    box = tuple(slice(a, b + 1) for a, b in zip(idx.min(0), idx.max(0)))
    padded = np.pad(mask[box], 1, constant_values=False)
    d = ndimage.distance_transform_edt(padded, sampling=spacing)
    out[box] = d[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return out


def next_click(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None
               ) -> tuple[tuple[int, ...], bool] | None:
    """The next simulated click: (index, is_positive) at the point of the larger error region (false negatives
    vs false positives, compared by their largest inner distance) farthest from that region's boundary;
    None when the prediction equals the reference. Works in 2D and 3D; ``spacing`` in the array's axis order."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    fn, fp = gt & ~pred, pred & ~gt
    if not fn.any() and not fp.any():
        return None
    dfn = _inner_distance(fn, spacing) if fn.any() else None
    dfp = _inner_distance(fp, spacing) if fp.any() else None
    positive = dfp is None or (dfn is not None and dfn.max() >= dfp.max())
    d = dfn if positive else dfp
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(d)), d.shape)), bool(positive)


def deepest_point(mask: np.ndarray, spacing: Sequence[float] | None = None) -> tuple[int, ...] | None:
    """The voxel of ``mask`` farthest from its boundary (None for an empty mask)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    d = _inner_distance(mask, spacing)
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(d)), d.shape))


def extent_mm(mask2d: np.ndarray, spacing_rc: Sequence[float]) -> float:
    """Equivalent diameter (mm) of a 2D mask: the diameter of the disk of the same area (0 when empty)."""
    area = float(np.count_nonzero(mask2d)) * float(spacing_rc[0]) * float(spacing_rc[1])
    return 2.0 * float(np.sqrt(area / np.pi))


class SliceCrop:
    """A ``size`` x ``size`` grid of ``pixel_mm`` pixels centred at ``centre_rc`` (row, col in the slice's pixels)
    of a slice with in-plane spacing ``spacing_rc`` (mm)."""

    def __init__(self, centre_rc: Sequence[float], spacing_rc: Sequence[float], size: int, pixel_mm: float):
        self.size, self.pixel_mm = int(size), float(pixel_mm)
        self.centre = np.asarray(centre_rc, float)
        self.spacing = np.asarray(spacing_rc, float)
        offs = (np.arange(self.size) - (self.size - 1) / 2.0) * self.pixel_mm
        self.rows = self.centre[0] + offs / self.spacing[0]   # slice pixel coordinate of each crop row
        self.cols = self.centre[1] + offs / self.spacing[1]

    def sample(self, slice2d: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
        rr, cc = np.meshgrid(self.rows, self.cols, indexing="ij")
        return ndimage.map_coordinates(np.asarray(slice2d, np.float32), [rr, cc], order=order, mode="constant",
                                       cval=cval).astype(np.float32)

    def to_crop(self, rc: Sequence[float]) -> tuple[float, float]:
        """Slice pixel (row, col) -> crop pixel (row, col)."""
        return ((rc[0] - self.rows[0]) * self.spacing[0] / self.pixel_mm,
                (rc[1] - self.cols[0]) * self.spacing[1] / self.pixel_mm)

    def footprint(self, shape: Sequence[int]) -> tuple[slice, slice]:
        """The slice pixels the crop covers (clipped to the slice)."""
        r0 = max(int(np.ceil(self.rows[0])), 0)
        r1 = min(int(np.floor(self.rows[-1])) + 1, int(shape[0]))
        c0 = max(int(np.ceil(self.cols[0])), 0)
        c1 = min(int(np.floor(self.cols[-1])) + 1, int(shape[1]))
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def paste(self, crop_map: np.ndarray, shape: Sequence[int], order: int = 1, fill: float = 0.0) -> np.ndarray:
        """A crop-grid map resampled onto the slice (``shape``); pixels outside the crop get ``fill``."""
        out = np.full(tuple(int(s) for s in shape), fill, np.float32)
        rs, cs = self.footprint(shape)
        if rs.stop <= rs.start or cs.stop <= cs.start:
            return out
        rr, cc = np.meshgrid(np.arange(rs.start, rs.stop), np.arange(cs.start, cs.stop), indexing="ij")
        cr = (rr - self.rows[0]) * self.spacing[0] / self.pixel_mm
        ccol = (cc - self.cols[0]) * self.spacing[1] / self.pixel_mm
        out[rs, cs] = ndimage.map_coordinates(np.asarray(crop_map, np.float32), [cr, ccol], order=order,
                                              mode="nearest")
        return out
