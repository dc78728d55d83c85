"""Click-by-click PET lesion segmentation (PE-MED or a classical threshold) and the lesion measures of nuclear
medicine reports. Engine side: numpy/torch/SimpleITK only; the Segment Editor effect and the ``lesion`` command
drive a :class:`LesionSession`.

Methods (``METHODS``)

* ``pemed``: the PE-MED network (:mod:`.pemed`) on the clicked axial slice, then carried through the slices above
  and below: each neighbouring slice is segmented with the previous slice's mask as the previous-mask prompt and
  one positive click at that mask's deepest point, until a slice comes out empty, a slice with its own clicks is
  reached, or ``max_propagation_mm``; a slice keeps only the parts of its prediction that touch the previous
  slice's mask (or, on a clicked slice, hold a positive click or touch the segment before the click), and a
  propagated slice that grows beyond ``max_growth`` times the previous one ends the propagation (a leak into a
  neighbouring hot organ). The first interaction runs the paper's self-loop warm start (a second pass
  with the first pass's mask as the previous mask and the same click). Each slice keeps its last logits for TSIP.
* ``suv2.5``, ``41pct``, ``50pct``, ``percist``: the thresholds clinicians use, seeded by the click: a fixed SUV of
  2.5; 41 % or 50 % of the lesion's SUVmax (EANM guideline, Boellaard et al. 2015); PERCIST's liver threshold
  1.5 x liver SUVmean + 2 SD (needs a liver mask). The region is the face-connected component of voxels at or
  above the threshold that holds the click (or, when the click itself is below it, the component of the hottest
  voxel within 10 mm of the click). The lesion's SUVmax for the relative thresholds is found iteratively: the
  maximum within 10 mm of the click, then the maximum of the region it gives, until the region no longer changes.
  A negative click removes the connected part of the segment under it (refused when that part holds a positive
  click: a threshold region cannot be split).

Every click is one undo step (:meth:`LesionSession.undo` restores the mask exactly).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.metrics import percist_liver_threshold, sphere_kernel

from .clicks import SliceCrop, deepest_point, extent_mm

if TYPE_CHECKING:
    from collections.abc import Sequence

    import SimpleITK as sitk

METHODS = ("pemed", "suv2.5", "41pct", "50pct", "percist")
THRESHOLD_METHODS = METHODS[1:]
METHOD_LABELS = {"pemed": "PE-MED (interactive network)", "suv2.5": "SUV >= 2.5", "41pct": "41 % of SUVmax",
                 "50pct": "50 % of SUVmax", "percist": "PERCIST liver threshold"}
DEFAULT_MODEL = "segmentation-pemed-cpu"
BODY_SUV = 0.05        # a click where the 3x3x3 mean SUV is below this is outside the body
SEARCH_MM = 10.0       # the neighbourhood of a click searched for the lesion's hottest voxel
FACES = ndimage.generate_binary_structure(3, 1)


def method_name(method: str) -> str:
    m = str(method).strip().lower().replace(" ", "")
    aliases = {"pe-med": "pemed", "suv25": "suv2.5", "2.5": "suv2.5", "41": "41pct", "41%": "41pct",
               "50": "50pct", "50%": "50pct"}
    m = aliases.get(m, m)
    if m not in METHODS:
        raise InputError(f"Unknown lesion method '{method}': choose one of {', '.join(METHODS)}")
    return m


def _component_at(mask: np.ndarray, zyx: Sequence[int]) -> np.ndarray:
    """The face-connected component of ``mask`` holding voxel ``zyx`` (labelled in its bounding box only)."""
    z, y, x = zyx
    if not mask[z, y, x]:
        return np.zeros_like(mask, bool)
    lab, _ = ndimage.label(mask, structure=FACES)
    return lab == lab[z, y, x]


def _ball_offsets(spacing_zyx, radius_mm):
    k = sphere_kernel(spacing_zyx, radius_mm).astype(bool)
    return np.argwhere(k) - np.asarray(k.shape) // 2


def hottest_near(suv: np.ndarray, zyx: Sequence[int], spacing_zyx: Sequence[float], radius_mm: float = SEARCH_MM
                 ) -> tuple[int, int, int]:
    """The voxel with the highest value within ``radius_mm`` of ``zyx``."""
    pts = np.asarray(zyx) + _ball_offsets(spacing_zyx, radius_mm)
    pts = pts[np.all((pts >= 0) & (pts < np.asarray(suv.shape)), axis=1)]
    vals = suv[pts[:, 0], pts[:, 1], pts[:, 2]]
    return tuple(int(v) for v in pts[int(np.argmax(vals))])


def threshold_region(suv: np.ndarray, zyx: Sequence[int], spacing_zyx: Sequence[float], method: str,
                     liver_threshold: float | None = None) -> tuple[np.ndarray, float]:
    """(region, threshold) of a click-seeded threshold method (see the module notes)."""
    method = method_name(method)
    zyx = tuple(int(v) for v in zyx)
    peak = hottest_near(suv, zyx, spacing_zyx)

    def region_for(t, seed):
        hot = suv >= t
        return _component_at(hot, zyx if hot[zyx] else seed)

    if method == "suv2.5":
        t = 2.5
        return region_for(t, peak), t
    if method == "percist":
        if liver_threshold is None:
            raise InputError("The PERCIST threshold needs a liver reference: give a liver segment or mask")
        return region_for(liver_threshold, peak), float(liver_threshold)
    frac = 0.41 if method == "41pct" else 0.50
    suvmax = float(suv[peak])
    region, t = None, frac * suvmax
    for _ in range(10):
        region = region_for(t, peak)
        if not region.any():
            break
        idx = np.argwhere(region)
        vals = suv[region]
        if float(vals.max()) <= suvmax:
            break
        peak = tuple(int(v) for v in idx[int(np.argmax(vals))])
        suvmax, t = float(vals.max()), frac * float(vals.max())
    return region, t


class PEMEDPredictor:
    """A trained PE-MED model and its input conventions; :meth:`predict_slice` runs one 2D interaction."""

    def __init__(self, model: str | dict = DEFAULT_MODEL, device: str = "cpu", progress=None):
        import torch

        from PETWorkbenchLib.device import torch_device
        from PETWorkbenchLib.models import load_model_checkpoint

        from .pemed import build_pemed, crop_geometry
        ckpt = model if isinstance(model, dict) else load_model_checkpoint(model, progress=progress)
        cfg = ckpt["config"]
        if cfg.get("task") != "pemed":
            from PETWorkbenchLib.errors import ModelError
            raise ModelError(f"The model '{model if not isinstance(model, dict) else cfg.get('name')}' is not a "
                             "PE-MED model")
        self.cfg = cfg
        self.dev = torch_device(device)
        self.net = build_pemed(cfg).to(self.dev).eval()
        self.net.load_state_dict(ckpt["state_dict"])
        self.size, self.pixel_mm, self.radius = crop_geometry(cfg)
        inf = cfg.get("inference", {})
        self.max_propagation_mm = float(inf.get("max_propagation_mm", 150.0))
        self.min_pixels = int(inf.get("min_pixels", 1))
        self.max_growth = float(inf.get("max_growth", 2.0))
        self._torch = torch

    def pixel_for(self, extent: float | None, reach: float | None = None) -> float:
        """Crop pixel size (mm) for an object of this equivalent diameter reaching this far from the crop centre
        (mm): Zoom-In (``pemed.zoom_pixel_mm``)."""
        from .pemed import zoom_pixel_mm
        return zoom_pixel_mm(self.cfg, extent, reach)

    def predict_slice(self, suv2d, spacing_rc, centre_rc, clicks_rc, prev2d, prev_logits2d=None, pixel_mm=None):
        """Logits on the slice grid (outside the crop: -20) for clicks [(row, col, positive)] in slice pixels;
        ``pixel_mm``: the crop's pixel size (default: the model's)."""
        torch = self._torch
        from .pemed import disk_maps, normalise_suv
        crop = SliceCrop(centre_rc, spacing_rc, self.size, pixel_mm or self.pixel_mm)
        img = normalise_suv(crop.sample(suv2d))
        maps = disk_maps(img.shape, [(*crop.to_crop((r, c)), p) for r, c, p in clicks_rc], self.radius)
        prev = crop.sample(np.asarray(prev2d, np.float32), order=0)
        t = [torch.from_numpy(a[None, None].copy()).to(self.dev) for a in (img, maps[0], maps[1], prev)]
        prev_out = None
        if prev_logits2d is not None:
            prev_out = torch.from_numpy(crop.sample(prev_logits2d, order=1, cval=-20.0)[None, None]).to(self.dev)
        with torch.no_grad():
            logits = self.net(*t, prev_out)[0, 0].float().cpu().numpy()
        return crop.paste(logits, suv2d.shape, order=1, fill=-20.0)


class LesionSession:
    """Interactive segmentation of one lesion in a PET volume (SimpleITK image in SUV, checked on entry).

    ``add_click(ijk, positive)`` takes the voxel index (i, j, k) in ITK/Slicer order and returns the new mask
    (numpy bool, (k, j, i) order); ``undo()`` goes back one click. ``initial_mask`` continues from an existing
    segment (the PE-MED previous mask); ``liver_mask`` (same grid) gives PERCIST's threshold."""

    def __init__(self, image: sitk.Image, method: str = "pemed", model: str | dict | PEMEDPredictor = DEFAULT_MODEL,
                 device: str = "cpu", liver_mask: np.ndarray | None = None, initial_mask: np.ndarray | None = None,
                 progress=None):
        import SimpleITK as sitk

        from PETWorkbenchLib.units import check_pet_image
        check_pet_image(image, "The PET volume")
        self.method = method_name(method)
        self.suv = sitk.GetArrayFromImage(image).astype(np.float32)
        self.spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
        self.mask = np.zeros(self.suv.shape, bool) if initial_mask is None else np.array(initial_mask, bool)
        if self.mask.shape != self.suv.shape:
            raise InputError(f"The starting segment has shape {self.mask.shape}, the PET {self.suv.shape}: they must "
                             "be on the same grid")
        self.clicks: list[tuple[tuple[int, int, int], bool]] = []   # ((z, y, x), positive)
        self._undo: list[tuple] = []
        self._logits: dict[int, np.ndarray] = {}
        self.liver_threshold = None
        if liver_mask is not None:
            liver = np.asarray(liver_mask, bool)
            if liver.shape != self.suv.shape:
                raise InputError(f"The liver mask has shape {liver.shape}, the PET {self.suv.shape}: they must be on "
                                 "the same grid")
            self.liver_threshold = percist_liver_threshold(self.suv[liver])
        if self.method == "percist" and self.liver_threshold is None:
            raise InputError("The PERCIST threshold needs a liver reference: give a liver segment or mask")
        self.predictor = None
        if self.method == "pemed":
            self.predictor = model if hasattr(model, "predict_slice") else PEMEDPredictor(model, device, progress)
        self.last_seconds = 0.0

    # ------------------------------------------------------------------------------------------- clicks
    def _check_click(self, ijk):
        try:
            i, j, k = (int(round(float(c))) for c in ijk)
        except (TypeError, ValueError):
            raise InputError(f"A click must be three voxel indices (i, j, k), got {ijk!r}") from None
        nz, ny, nx = self.suv.shape
        if not (0 <= i < nx and 0 <= j < ny and 0 <= k < nz):
            raise InputError(f"The click (i, j, k) = ({i}, {j}, {k}) is outside the volume of size "
                             f"(i, j, k) = ({nx}, {ny}, {nz})")
        box = self.suv[max(k - 1, 0):k + 2, max(j - 1, 0):j + 2, max(i - 1, 0):i + 2]
        if float(box.mean()) < BODY_SUV:
            raise InputError(f"The click at voxel (i, j, k) = ({i}, {j}, {k}) is outside the body (SUV "
                             f"{float(box.mean()):.2f} there): click on the lesion")
        return k, j, i

    def add_click(self, ijk: Sequence[float], positive: bool = True) -> np.ndarray:
        zyx = self._check_click(ijk)
        t0 = time.perf_counter()
        old_mask, old_logits = self.mask, dict(self._logits)
        if self.method == "pemed":
            new = self._pemed_click(zyx, bool(positive))
        else:
            new = self._threshold_click(zyx, bool(positive))
        self._undo.append((old_mask, old_logits, len(self.clicks)))
        self.clicks.append((zyx, bool(positive)))
        self.mask = new
        self.last_seconds = time.perf_counter() - t0
        return self.mask

    def undo(self) -> np.ndarray:
        """Back to the mask before the last click (exactly)."""
        if not self._undo:
            raise InputError("Nothing to undo: no click yet")
        self.mask, self._logits, n = self._undo.pop()
        del self.clicks[n:]
        return self.mask

    # ------------------------------------------------------------------------------------------- thresholds
    def _threshold_click(self, zyx, positive):
        mask = self.mask.copy()
        if positive:
            region, t = threshold_region(self.suv, zyx, self.spacing, self.method, self.liver_threshold)
            if not region.any():
                raise InputError(f"No voxel at or above the threshold (SUV {t:.2f}) near the click: the click is not "
                                 "on a lesion for this method")
            mask |= region
        else:
            part = _component_at(mask, zyx)
            if any(p and part[c] for c, p in self.clicks):
                raise InputError("This part of the segment holds a positive click: a threshold cannot split it "
                                 "(use PE-MED, or undo the positive click)")
            mask &= ~part
        return mask

    # ------------------------------------------------------------------------------------------- PE-MED
    def _slice_clicks(self, z, extra=None):
        cl = [(y, x, p) for (cz, y, x), p in self.clicks if cz == z]
        if extra is not None:
            cl.append(extra)
        return cl

    def _run_slice(self, z, clicks, prev, prev_logits, centre, geometry=(None, None)):
        """One PE-MED pass on slice ``z``; ``geometry`` = (extent, reach) of the object for Zoom-In."""
        pixel_for = getattr(self.predictor, "pixel_for", None)
        pixel = pixel_for(*geometry) if pixel_for is not None else None
        kw = {} if pixel is None else {"pixel_mm": pixel}
        return self.predictor.predict_slice(self.suv[z], self.spacing[1:], centre, clicks, prev, prev_logits, **kw)

    def _reach(self, region, points, centre):
        """Largest distance (mm) from ``centre`` (row, col) of the region's pixels and the points."""
        pts = np.argwhere(region).astype(float)
        if len(points):
            pts = np.concatenate([pts, np.asarray(points, float).reshape(-1, 2)])
        if not len(pts):
            return None
        d = (pts - np.asarray(centre, float)) * np.asarray(self.spacing[1:], float)
        return float(np.sqrt((d ** 2).sum(1)).max())

    def _object_geometry(self, z, prev, pos, clicks, centre):
        """(extent, reach) of the object on slice ``z`` for Zoom-In: the equivalent diameter (mm) of the segment there
        together with the hot region at each positive click (face-connected, at least 50 % of the SUVmax within 10
        mm of the click, on this slice; taken at that maximum when the clicked pixel is below it), and how far (mm)
        that region and the slice's clicks reach from the crop centre. (None, None) when nothing is known."""
        region = np.array(prev, bool)
        sl = self.suv[z]
        rad = np.ceil(SEARCH_MM / np.asarray(self.spacing[1:])).astype(int)
        hot = None
        for r, c in pos:
            r, c = int(round(r)), int(round(c))
            r0, c0 = max(r - rad[0], 0), max(c - rad[1], 0)
            win = sl[r0:r + rad[0] + 1, c0:c + rad[1] + 1]
            peak = float(win.max()) if win.size else 0.0
            if peak <= BODY_SUV:
                continue
            if sl[r, c] < 0.5 * peak:
                r, c = (int(v) for v in np.add(np.unravel_index(int(np.argmax(win)), win.shape), (r0, c0)))
            if hot is None or hot[1] != peak:
                hot = (ndimage.label(sl >= 0.5 * peak)[0], peak)
            region |= hot[0] == hot[0][r, c]
        if not region.any():
            return None, None
        return extent_mm(region, self.spacing[1:]), self._reach(region, [(r, c) for r, c, _ in clicks], centre)

    def _pemed_click(self, zyx, positive):
        z, y, x = zyx
        pred = self.predictor
        mask = self.mask.copy()
        clicks = self._slice_clicks(z, (y, x, positive))
        pos = [(r, c) for r, c, p in clicks if p]
        prev = mask[z]
        if pos:
            centre = np.mean(pos, axis=0)
        elif prev.any():
            centre = np.argwhere(prev).mean(axis=0)
        else:
            centre = np.array([y, x], float)
        first = not self.clicks and not mask.any()
        geometry = self._object_geometry(z, prev, pos, clicks, centre)
        logits = self._run_slice(z, clicks, prev, self._logits.get(z), centre, geometry)
        if first:  # self-loop warm start: the same click again with the first pass's mask as the previous mask
            logits = self._run_slice(z, clicks, logits > 0, logits, centre, geometry)
        self._logits = dict(self._logits)
        self._logits[z] = logits
        mask[z] = _connected_to(logits > 0, prev, [(int(round(r)), int(round(c))) for r, c in pos])
        anchored = {cz for (cz, _, _), _ in self.clicks} | {z}
        max_slices = int(pred.max_propagation_mm / self.spacing[0])
        for step in (-1, 1):
            zz, n = z + step, 0
            if not mask[z].any() and any((cz - z) * step > 0 for cz in anchored):
                continue  # the clicked slice came out empty: the slices towards another clicked slice stay theirs
            while 0 <= zz < mask.shape[0] and zz not in anchored and n < max_slices:
                src = mask[zz - step]
                if src.sum() < pred.min_pixels:
                    mask[zz] = False
                    self._logits.pop(zz, None)
                    zz, n = zz + step, n + 1
                    # past the end of the object: clear what an earlier propagation left in this direction
                    while 0 <= zz < mask.shape[0] and zz not in anchored and mask[zz].any():
                        mask[zz] = False
                        self._logits.pop(zz, None)
                        zz += step
                    break
                r, c = deepest_point(src, self.spacing[1:])
                lg = self._run_slice(zz, [(r, c, True)], src, None, (r, c),
                                     (extent_mm(src, self.spacing[1:]), self._reach(src, [], (r, c))))
                self._logits[zz] = lg
                new = _connected_to(lg > 0, src, [])
                if new.sum() > pred.max_growth * src.sum() + 8:   # a leak into a neighbouring hot structure
                    new[:] = False
                mask[zz] = new
                zz, n = zz + step, n + 1
        return mask


def _connected_to(new: np.ndarray, prev: np.ndarray, points: Sequence[tuple[int, int]]) -> np.ndarray:
    """The parts of a slice's new mask that overlap the previous mask or hold a positive click."""
    if not new.any():
        return new
    lab, n = ndimage.label(new)
    keep = set(np.unique(lab[new & np.asarray(prev, bool)]).tolist())
    keep |= {int(lab[r, c]) for r, c in points if 0 <= r < new.shape[0] and 0 <= c < new.shape[1]}
    keep.discard(0)
    return np.isin(lab, list(keep)) if keep else np.zeros_like(new)


def click_to_index(image: sitk.Image, point: Sequence[float], space: str = "lps") -> tuple[float, float, float]:
    """A click given in physical LPS mm, RAS mm (Slicer's coordinates) or as voxel indices -> continuous (i, j, k)."""
    space = str(space).lower()
    p = [float(v) for v in point]
    if space == "ijk":
        return tuple(p)
    if space == "ras":
        p = [-p[0], -p[1], p[2]]
    elif space != "lps":
        raise InputError(f"Unknown click space '{space}': lps, ras or ijk")
    return tuple(image.TransformPhysicalPointToContinuousIndex(p))


def parse_click(text: str) -> tuple[tuple[float, float, float], bool]:
    """'x,y,z' or 'x,y,z:+' (positive) / 'x,y,z:-' (negative)."""
    s = str(text).strip()
    sign = "+"
    if ":" in s:
        s, sign = s.rsplit(":", 1)
        sign = sign.strip()
    if sign not in ("+", "-"):
        raise InputError(f"Click '{text}': the suffix must be ':+' (add) or ':-' (remove)")
    try:
        xyz = tuple(float(v) for v in s.split(","))
    except ValueError:
        raise InputError(f"Click '{text}' is not three numbers x,y,z") from None
    if len(xyz) != 3 or not all(np.isfinite(xyz)):
        raise InputError(f"Click '{text}' is not three finite numbers x,y,z")
    return xyz, sign == "+"


# --------------------------------------------------------------------------------------------- lesion measures
MEASURE_COLUMNS = ("lesion", "method", "n_clicks", "suv_max", "suv_peak", "suv_mean", "mtv_ml", "tlg",
                   "reference_region", "reference_suv_mean", "suv_max_to_reference")


def lesion_measures(suv: np.ndarray, mask: np.ndarray, spacing_zyx: Sequence[float],
                    liver_mask: np.ndarray | None = None) -> dict:
    """SUVmax, SUVpeak (highest mean in a 1 cm^3 sphere centred in the lesion, PERCIST), SUVmean, metabolic tumour
    volume (ml), total lesion glycolysis (SUVmean x MTV) and, with a liver mask, the liver SUVmean as the reference
    region. Raises InputError for an empty mask."""
    mask = np.asarray(mask, bool)
    if mask.shape != np.shape(suv):
        raise InputError(f"The lesion mask {mask.shape} and the PET {np.shape(suv)} are not on the same grid")
    if not mask.any():
        raise InputError("The lesion segment is empty: nothing to measure")
    vals = np.asarray(suv, np.float64)[mask]
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    kernel = sphere_kernel(spacing_zyx)
    r = np.asarray(kernel.shape) // 2
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - r, 0)
    hi = np.minimum(idx.max(0) + r + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = np.asarray(suv, np.float64)[box]
    sums = ndimage.correlate(sub, kernel, mode="constant", cval=0.0)
    counts = ndimage.correlate(np.ones_like(sub), kernel, mode="constant", cval=0.0)
    # spheres are centred on lesion voxels, which lie at least one kernel radius inside the box (except at the
    # image border, where the missing voxels do not count, as in metrics.sphere_mean)
    peak = float((sums / counts)[mask[box]].max())
    mean = float(vals.mean())
    mtv = float(mask.sum()) * voxel_ml
    out = dict(suv_max=float(vals.max()), suv_peak=peak, suv_mean=mean, mtv_ml=mtv, tlg=mean * mtv,
               reference_region=None, reference_suv_mean=None, suv_max_to_reference=None)
    if liver_mask is not None:
        liver = np.asarray(liver_mask, bool)
        if liver.shape != mask.shape:
            raise InputError(f"The liver mask {liver.shape} and the PET {mask.shape} are not on the same grid")
        if liver.any():
            ref = float(np.asarray(suv)[liver].mean())
            out.update(reference_region="liver", reference_suv_mean=ref,
                       suv_max_to_reference=out["suv_max"] / ref if ref > 0 else None)
    return out
