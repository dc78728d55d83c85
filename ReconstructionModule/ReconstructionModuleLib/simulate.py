"""Phantoms, PET acquisition simulation and the multi-center data generator.

* Whole-body pseudo-PET on a real CT with TotalSegmentator organ labels (organ SUVs for 18F-FDG and 68Ga-FAPI,
  hot lesions of known SUV, per-patient uptake jitter, smooth elastic deformation, lesion placement).
* FDG brain phantom from the MNI152 (2009a) grey/white-matter probability maps shipped with nilearn.
* Center profiles mirroring DRMC Table 1 (:data:`CENTERS`).
* Acquisition: SUV -> attenuation (bilinear HU->mu at 511 keV from the CT) -> 2D multi-slice projection with PSF
  and normalisation -> scaled to the centre's count level, plus randoms+scatter -> Poisson -> OSEM.  Low dose:
  binomial thinning of the same prompts by the DRF -> the same OSEM.  Deterministic for a given seed.
* :func:`generate_dataset` writes NIfTI files and a ``manifest.csv``.

Sources of the uptake values are listed next to :data:`SUV_TABLE` and in METHOD.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.imageio import read_image, write_csv, write_image, write_json
from PETWorkbenchLib.progress import Reporter

from .lowdose import check_drf, poisson_sample, thin_counts
from .organs import LDOS_ORGANS, read_ts_label_table, ts_to_ldos_lut
from .osem import osem, sensitivity
from .projector import PETSystem, gaussian_filter_3d

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["CENTERS", "SUV_TABLE", "hu_to_mu", "shared_data_dir", "load_anatomy", "load_body_anatomy",
           "load_brain_anatomy", "make_patient", "simulate_case", "reproduce_case", "acquire", "generate_dataset",
           "generate_standard_set", "ensure_standard_set", "standard_set_key", "body_anatomy_dir", "MANIFEST_COLUMNS"]

# --------------------------------------------------------------------------------------------------------------
# Centre profiles (DRMC, Table 1).  Spacing is (x, y, z) mm, matrix the in-plane matrix of the centre.
# Values not in Table 1 are our assumptions (see METHOD.md): psf_fwhm_mm ~ the system's transaxial resolution,
# counts_per_cm = expected true coincidences per cm of axial coverage at full dose (long axial FOV systems C3/C4
# collect an order of magnitude more), and the reconstruction settings (iterations, subsets, post-filter).
# C6 is "similar to C1 but with different working locations and imaging preferences" (DRMC Sec. 3.3): same
# scanner model and grid, other count level, iterations and post-filter.
# --------------------------------------------------------------------------------------------------------------
CENTERS = {
    "C1": dict(institution="I1", known=True, region="whole_body", lesions=True, system="PolarStar m660",
               tracer="FDG", dose_mbq=293, drf=12, spacing=(3.15, 3.15, 1.87), matrix=192,
               psf_fwhm_mm=4.5, counts_per_cm=2.0e6, n_iter=2, n_subsets=10, post_filter_mm=4.0),
    "C2": dict(institution="I2", known=True, region="whole_body", lesions=True, system="PolarStar Flight",
               tracer="FDG", dose_mbq=293, drf=4, spacing=(3.12, 3.12, 1.75), matrix=192,
               psf_fwhm_mm=4.0, counts_per_cm=2.5e6, n_iter=3, n_subsets=8, post_filter_mm=3.0),
    "C3": dict(institution="I3", known=True, region="whole_body", lesions=True, system="United Imaging uEXPLORER",
               tracer="FDG", dose_mbq=296, drf=10, spacing=(1.67, 1.67, 2.89), matrix=256,
               psf_fwhm_mm=3.0, counts_per_cm=2.0e7, n_iter=3, n_subsets=10, post_filter_mm=2.0),
    "C4": dict(institution="I4", known=True, region="whole_body", lesions=True,
               system="Siemens Biograph Vision Quadra", tracer="FDG", dose_mbq=296, drf=10,
               spacing=(1.65, 1.65, 1.65), matrix=256, psf_fwhm_mm=3.3, counts_per_cm=1.5e7, n_iter=4,
               n_subsets=5, post_filter_mm=2.0),
    "C5": dict(institution="I5", known=False, region="brain", lesions=False, system="PolarStar m660",
               tracer="FDG", dose_mbq=293, drf=4, spacing=(1.18, 1.18, 1.87), matrix=256,
               psf_fwhm_mm=4.5, counts_per_cm=4.0e6, n_iter=4, n_subsets=8, post_filter_mm=2.0),
    "C6": dict(institution="I6", known=False, region="whole_body", lesions=True, system="PolarStar m660",
               tracer="FDG", dose_mbq=293, drf=12, spacing=(3.15, 3.15, 1.87), matrix=192,
               psf_fwhm_mm=4.5, counts_per_cm=1.5e6, n_iter=3, n_subsets=8, post_filter_mm=5.0),
}

# --------------------------------------------------------------------------------------------------------------
# Organ SUVs (body-weight SUVmean, typical adult, ~60 min p.i.).  Representative values inside the ranges
# reported by:
#  FDG : Zincirkeser et al., Mol Imaging Radionucl Ther 2007 ("Standardized uptake values of normal organs on
#        18F-FDG PET and CT"); Paquet et al., J Nucl Med 2004;45:784 (within-patient variability of liver/blood
#        SUVs); Wang et al., Nucl Med Commun 2007 (normal organ SUVs); bladder/urine and kidney values vary widely
#        because of excretion.  Grey/white matter ~ 3:1 (e.g. Phelps et al., Ann Neurol 1979).
#  FAPI: Giesel et al., J Nucl Med 2019;60:386 (68Ga-FAPI-02/-04 biodistribution: low brain, liver, muscle and
#        blood pool, renal excretion) and Kratochwil et al., J Nucl Med 2019;60:801 (tumour SUVmax mostly > 6,
#        many entities > 12).
# "body" = soft tissue not otherwise labelled, "fat" = adipose tissue (from CT HU), "bone" = unlabelled bone.
# Each entry: name -> (FDG, FAPI).
# --------------------------------------------------------------------------------------------------------------
SUV_TABLE = {
    "liver": (2.3, 1.2), "spleen": (1.9, 1.0), "kidney": (2.8, 3.0), "urinary_bladder": (12.0, 15.0),
    "heart": (3.5, 1.5), "aorta": (1.7, 1.6), "blood": (1.7, 1.6), "lung": (0.55, 0.5), "stomach": (1.9, 1.3),
    "colon": (1.6, 1.0), "small_bowel": (1.5, 1.0), "duodenum": (1.6, 1.1), "pancreas": (1.6, 2.0),
    "esophagus": (1.6, 1.2), "gallbladder": (0.8, 0.8), "prostate": (1.6, 1.3), "adrenal": (1.5, 1.2),
    "brain": (8.0, 0.2), "grey_matter": (9.0, 0.25), "white_matter": (3.0, 0.15), "csf": (0.3, 0.1),
    "marrow": (1.8, 1.0), "bone": (0.9, 0.8), "muscle": (0.8, 1.1), "spinal_cord": (1.3, 0.4),
    "thyroid": (1.5, 1.5), "trachea": (0.4, 0.4), "body": (0.8, 0.9), "fat": (0.35, 0.3), "scalp": (0.8, 0.8),
    "skull": (0.6, 0.6),
}
# lesion SUV ranges (uniform), per tracer
LESION_SUV = {"FDG": (4.0, 14.0), "FAPI": (6.0, 18.0)}
TRACERS = ("FDG", "FAPI")


def _ts_class_to_tissue(name: str) -> str:
    """Map a TotalSegmentator class name to a key of :data:`SUV_TABLE`."""
    if name.startswith("vertebrae_") or name in ("sacrum", "hip_left", "hip_right"):
        return "marrow"
    if name.startswith("lung_"):
        return "lung"
    if name.startswith(("rib_", "humerus", "scapula", "clavicula", "femur", "skull", "sternum")) or \
            name == "costal_cartilages":
        return "bone"
    if name.startswith(("gluteus", "iliopsoas", "autochthon")):
        return "muscle"
    if name.startswith("kidney"):
        return "kidney"
    if name.startswith("adrenal"):
        return "adrenal"
    if name.startswith(("iliac_", "subclavian", "common_carotid", "brachiocephalic", "pulmonary_vein")) or \
            name in ("superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein",
                     "atrial_appendage_left"):
        return "blood"
    if name == "thyroid_gland":
        return "thyroid"
    if name in SUV_TABLE:
        return name
    return "body"


# --------------------------------------------------------------------------------------------------------------
# CT -> 511 keV attenuation
# --------------------------------------------------------------------------------------------------------------
def hu_to_mu(hu: np.ndarray, kvp: int = 120) -> np.ndarray:
    """Bilinear HU -> linear attenuation coefficient at 511 keV, in 1/mm.

    Carney et al., Med Phys 2006;33:976 (120 kVp): mu = 9.6e-5 (HU + 1000) for HU + 1000 <= 1047 and
    mu = 5.10e-5 (HU + 1000) + 4.71e-2 above (1/cm); continuous at the break point, water = 0.096 /cm.
    Only 120 kVp is tabulated here.
    """
    if int(kvp) != 120:
        raise InputError(f"only the 120 kVp HU->mu conversion is implemented, got {kvp} kVp")
    h = np.asarray(hu, dtype=np.float64) + 1000.0
    h = np.clip(h, 0.0, None)
    mu = np.where(h <= 1047.0, 9.6e-5 * h, 5.10e-5 * h + 4.71e-2)
    return (mu / 10.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Anatomy sources
# --------------------------------------------------------------------------------------------------------------
def shared_data_dir() -> Path:
    """Folder with the shared example data (``PETWORKBENCH_SHARED_DATA`` or ``<repo>/../shared/data``)."""
    env = os.environ.get("PETWORKBENCH_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


_ANATOMY_CACHE = {}


def body_anatomy_dir() -> Path:
    """The body CT with its TotalSegmentator labels: the shared data folder's copy when there is one, else the
    same files shipped in ``Resources/SampleData/TotalSegmentatorExampleCT`` (so a clone needs nothing else)."""
    shared = shared_data_dir() / "totalsegmentator_example_ct"
    if (shared / "example_ct.nii.gz").is_file():
        return shared
    from PETWorkbenchLib.paths import resources_dir
    return resources_dir() / "SampleData" / "TotalSegmentatorExampleCT"


def load_body_anatomy(folder: str | Path | None = None) -> dict:
    """Real CT + TotalSegmentator labels: dict(ct=Image(HU), ts=Image(labels), names={value: name})."""
    folder = Path(folder) if folder else body_anatomy_dir()
    key = ("body", str(folder))
    if key in _ANATOMY_CACHE:
        return _ANATOMY_CACHE[key]
    ct_p, seg_p, tab_p = (folder / "example_ct.nii.gz", folder / "example_seg_fast_force_split.nii.gz",
                          folder / "labels_total_v2.tsv")
    for p in (ct_p, seg_p, tab_p):
        if not p.exists():
            raise InputError(f"anatomy file not found: {p} (set PETWORKBENCH_SHARED_DATA to the data folder)")
    ct = read_image(ct_p, "anatomy CT", pixel_type=sitk.sitkFloat32)
    ts = read_image(seg_p, "anatomy label map", pixel_type=sitk.sitkUInt8)
    if ct.GetSize() != ts.GetSize():
        raise InputError(f"CT {ct.GetSize()} and label map {ts.GetSize()} grids differ")
    ts.CopyInformation(ct)
    out = dict(ct=ct, ts=ts, names=read_ts_label_table(tab_p), kind="body")
    _ANATOMY_CACHE[key] = out
    return out


def _nib_to_sitk(img):
    """nibabel RAS image -> SimpleITK (LPS) float image (axis-aligned affines only)."""
    a = np.asarray(img.dataobj, dtype=np.float32)
    aff = np.asarray(img.affine, dtype=np.float64)
    if np.count_nonzero(aff[:3, :3] - np.diag(np.diag(aff[:3, :3]))):
        raise InputError("only axis-aligned template affines are supported")
    out = sitk.GetImageFromArray(np.ascontiguousarray(a.transpose(2, 1, 0)))
    d = np.diag(aff[:3, :3])
    out.SetSpacing([float(abs(v)) for v in d])
    flip = np.array([-1.0, -1.0, 1.0])
    out.SetOrigin([float(v) for v in aff[:3, 3] * flip])
    out.SetDirection([float(np.sign(d[0]) * flip[0]), 0, 0, 0, float(np.sign(d[1]) * flip[1]), 0, 0, 0,
                      float(np.sign(d[2]) * flip[2])])
    return out


def load_anatomy(region: str, folder: str | Path | None = None) -> dict:
    """The anatomy a centre profile's ``region`` uses: the brain MRI for "brain", else the body CT (``folder``)."""
    return load_brain_anatomy() if region == "brain" else load_body_anatomy(folder)


def load_brain_anatomy() -> dict:
    """MNI152 2009a grey/white-matter maps (nilearn, offline) + a synthetic head (scalp, skull, CSF) and CT."""
    key = ("brain",)
    if key in _ANATOMY_CACHE:
        return _ANATOMY_CACHE[key]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets
        gm = _nib_to_sitk(datasets.load_mni152_gm_template(resolution=1))
        wm = _nib_to_sitk(datasets.load_mni152_wm_template(resolution=1))
        mask = _nib_to_sitk(datasets.load_mni152_brain_mask(resolution=1))
    g, w, m = (sitk.GetArrayFromImage(x) for x in (gm, wm, mask))
    from scipy import ndimage
    brain = m > 0.5
    # head: dilate brain by ~4 mm of CSF/meninges, ~6 mm of skull, ~5 mm of scalp
    inner = ndimage.binary_dilation(brain, iterations=4)
    skull = ndimage.binary_dilation(inner, iterations=6) & ~inner
    head = ndimage.binary_dilation(inner | skull, iterations=5)
    ct = np.full(g.shape, -1000.0, np.float32)
    ct[head] = 20.0
    ct[skull] = 1100.0
    ct[inner] = 10.0
    ct[brain] = 30.0 + 10.0 * g[brain]
    ts = np.zeros(g.shape, np.uint8)
    # pseudo label codes local to the brain phantom: 1 gm, 2 wm, 3 csf, 4 skull, 5 scalp
    ts[head] = 5
    ts[skull] = 4
    ts[inner] = 3
    gmw = brain & ((g + w) > 0.5)
    ts[gmw & (g >= w)] = 1
    ts[gmw & (w > g)] = 2
    ct_i = sitk.GetImageFromArray(ct)
    ct_i.CopyInformation(gm)
    ts_i = sitk.GetImageFromArray(ts)
    ts_i.CopyInformation(gm)
    gmf = sitk.GetImageFromArray(np.where(brain, g, 0).astype(np.float32))
    gmf.CopyInformation(gm)
    wmf = sitk.GetImageFromArray(np.where(brain, w, 0).astype(np.float32))
    wmf.CopyInformation(gm)
    out = dict(ct=ct_i, ts=ts_i, gm=gmf, wm=wmf, names={1: "grey_matter", 2: "white_matter", 3: "csf", 4: "skull",
                                                          5: "scalp"}, kind="brain")
    _ANATOMY_CACHE[key] = out
    return out


# --------------------------------------------------------------------------------------------------------------
# Patients
# --------------------------------------------------------------------------------------------------------------
def key_entropy(key: object) -> int:
    """A 64-bit integer from the whole text of ``key`` (a hash: keys sharing a prefix still differ)."""
    return int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "little")


def _rng_for(seed, *keys):
    """Generator seeded by ``seed`` and every character of every key (patient id, tracer, centre)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed)] + [key_entropy(k) for k in keys]))


def _center_of(img):
    sz = np.array(img.GetSize(), dtype=float)
    return np.array(img.TransformContinuousIndexToPhysicalPoint(((sz - 1) / 2).tolist()))


def make_patient(anatomy: dict, seed: int, patient_key: str = "p0", tracers: Sequence[str] = TRACERS,
                 elastic_mm: float = 6.0, with_lesions: bool = True) -> dict:
    """Random "patient" built on one anatomy: a smooth spatial transform (output -> anatomy space, elastic
    B-spline + small anisotropic scaling), per-organ uptake jitter per tracer and lesions (centre, radii, SUV).
    """
    rng = _rng_for(seed, patient_key)
    ct = anatomy["ct"]
    c = _center_of(ct)
    aff = sitk.AffineTransform(3)
    aff.SetCenter(c.tolist())
    scale = rng.uniform(0.93, 1.07, 3)
    aff.SetMatrix(np.diag(1.0 / scale).ravel().tolist())
    aff.SetTranslation((rng.normal(0, 3.0, 3)).tolist())
    bs = sitk.BSplineTransformInitializer(ct, [4, 4, 4], 3)
    n = len(bs.GetParameters())
    params = rng.normal(0.0, elastic_mm / 2.0, n)  # ~N(0, elastic/2) coefficients -> displacements ~ elastic_mm
    bs.SetParameters(params.tolist())
    tx = sitk.CompositeTransform(3)
    tx.AddTransform(aff)
    tx.AddTransform(bs)
    # uptake jitter: per tissue, per tracer (log-normal); bladder/kidney vary more (excretion)
    jitter = {}
    for tr in tracers:
        j = {}
        for k in SUV_TABLE:
            sd = 0.35 if k in ("urinary_bladder", "kidney", "heart") else 0.15
            j[k] = float(math.exp(rng.normal(0.0, sd)))
        jitter[tr] = j
    lesions = []
    if with_lesions and anatomy["kind"] == "body":
        lesions = _place_lesions(anatomy, rng, tracers)
    return dict(key=str(patient_key), seed=int(seed), transform=tx, jitter=jitter, lesions=lesions,
                axial_u=float(rng.uniform(0.0, 1.0)), field_seed=int(rng.integers(0, 2 ** 31 - 1)))


def _place_lesions(anatomy, rng, tracers):
    ts = sitk.GetArrayFromImage(anatomy["ts"])
    names = anatomy["names"]
    inv = {}
    for v, nme in names.items():
        inv.setdefault(_ts_class_to_tissue(nme), []).append(v)
    hosts = {"liver": ["liver"], "lung": ["lung"], "bone": ["marrow"], "node": ["blood"],
             "pancreas": ["pancreas"], "spleen": ["spleen"], "kidney": ["kidney"], "soft": ["muscle"]}
    weights = {"liver": 3, "lung": 2, "bone": 3, "node": 3, "pancreas": 1, "spleen": 1, "kidney": 1, "soft": 1}
    avail = {}
    for h, tissues in hosts.items():
        vals = [v for t in tissues for v in inv.get(t, [])]
        m = np.isin(ts, vals)
        if h == "node":  # lymph nodes: next to the large vessels
            from scipy import ndimage
            m = ndimage.binary_dilation(m, iterations=2) & ~m & (ts == 0)
        idx = np.argwhere(m)
        if len(idx) > 20:
            avail[h] = idx
    if not avail:
        return []
    keys = sorted(avail)
    p = np.array([weights[k] for k in keys], float)
    p /= p.sum()
    out = []
    n_les = int(rng.integers(2, 6))
    for i in range(n_les):
        h = keys[int(rng.choice(len(keys), p=p))]
        zyx = avail[h][int(rng.integers(0, len(avail[h])))]
        pt = anatomy["ct"].TransformContinuousIndexToPhysicalPoint([float(zyx[2]) + rng.uniform(-.5, .5),
                                                                    float(zyx[1]) + rng.uniform(-.5, .5),
                                                                    float(zyx[0]) + rng.uniform(-.5, .5)])
        r = float(rng.uniform(4.0, 12.0))
        radii = (r * rng.uniform(0.8, 1.2, 3)).tolist()
        suv = {tr: float(rng.uniform(*LESION_SUV[tr])) for tr in tracers}
        out.append(dict(index=i + 1, host=h, center_mm=list(pt), radii_mm=radii, suv=suv))
    return out


# --------------------------------------------------------------------------------------------------------------
# Centre grids and ground truth on them
# --------------------------------------------------------------------------------------------------------------
def center_grid(anatomy: dict, profile: dict, axial_u: float = 0.5, max_slices: int | None = None,
                max_voxels: int | None = None) -> sitk.Image:
    """Reference image (centre spacing) covering the anatomy in-plane; a window of at most max_slices slices
    (placed by axial_u in [0, 1]) axially."""
    ct = anatomy["ct"]
    sp_src = np.array(ct.GetSpacing())
    ext = sp_src * np.array(ct.GetSize())
    sp = np.array(profile["spacing"], dtype=float)
    size = np.maximum(1, np.floor(ext / sp)).astype(int)
    size[:2] = np.minimum(size[:2], int(profile.get("matrix", size[:2].max())))
    nz_all = int(size[2])
    if max_slices:
        size[2] = min(size[2], int(max_slices))
    if max_voxels:
        size[2] = max(8, min(size[2], int(max_voxels // (size[0] * size[1]))))
    # centre in-plane on the anatomy, axial window at axial_u
    d = np.array(ct.GetDirection()).reshape(3, 3)
    c = _center_of(ct)
    z_off = (nz_all - size[2]) * sp[2] * (float(axial_u) - 0.5)
    center = c + d @ np.array([0.0, 0.0, z_off])
    origin = center - d @ ((size - 1) / 2.0 * sp)
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing(sp.tolist())
    ref.SetDirection(ct.GetDirection())
    ref.SetOrigin(origin.tolist())
    return ref


def _resample(img, ref, tx, interp, default):
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(ref)
    f.SetTransform(tx)
    f.SetInterpolator(interp)
    f.SetDefaultPixelValue(default)
    f.SetUseNearestNeighborExtrapolator(True)
    return f.Execute(img)


def _smooth_field(shape, rng, amp=0.1, coarse=6):
    from scipy import ndimage
    small = rng.normal(0.0, 1.0, [max(2, s // coarse) for s in shape])
    f = ndimage.zoom(small, [s / t for s, t in zip(shape, small.shape)], order=3)[:shape[0], :shape[1], :shape[2]]
    f = np.pad(f, [(0, s - t) for s, t in zip(shape, f.shape)], mode="edge")
    return (1.0 + amp * np.clip(f, -2.5, 2.5)).astype(np.float32)


def _dense_transform(tx, ref, factor=4):
    """The patient transform sampled as a displacement field on a coarse grid (fast to apply; it is smooth)."""
    sz = np.array(ref.GetSize())
    sp = np.array(ref.GetSpacing())
    csz = np.maximum(2, np.ceil(sz / factor).astype(int) + 2)
    csp = sp * (sz - 1) / np.maximum(csz - 3, 1)
    d = np.array(ref.GetDirection()).reshape(3, 3)
    corg = np.array(ref.GetOrigin()) - d @ csp
    disp = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, [int(v) for v in csz], corg.tolist(),
                                             csp.tolist(), ref.GetDirection())
    return sitk.DisplacementFieldTransform(disp)


def truth_on_grid(anatomy: dict, patient: dict, ref: sitk.Image, tracer: str) -> dict[str, np.ndarray]:
    """Ground truth on the reference grid: dict(suv, ct, ldos, lesions, mu) numpy (z, y, x) arrays."""
    if tracer not in TRACERS:
        raise InputError(f"unknown tracer {tracer!r}; choose one of {', '.join(TRACERS)}")
    tx = _dense_transform(patient["transform"], ref)
    ct = sitk.GetArrayFromImage(_resample(anatomy["ct"], ref, tx, sitk.sitkLinear, -1000.0))
    ts = sitk.GetArrayFromImage(_resample(anatomy["ts"], ref, tx, sitk.sitkNearestNeighbor, 0))
    ti = TRACERS.index(tracer) if tracer in TRACERS else 0
    jit = patient["jitter"].get(tracer, {})

    def suv(tissue):
        return SUV_TABLE[tissue][ti] * jit.get(tissue, 1.0)

    names = anatomy["names"]
    act = np.zeros(ct.shape, np.float32)
    ldos = np.zeros(ct.shape, np.uint8)
    if anatomy["kind"] == "body":
        body = ct > -500
        act[body] = suv("body")
        act[body & (ct < -30)] = suv("fat")
        act[body & (ct > 250)] = suv("bone")
        lut_t = {v: _ts_class_to_tissue(n) for v, n in names.items()}
        for v in np.unique(ts):
            if v == 0:
                continue
            act[ts == v] = suv(lut_t.get(int(v), "body"))
        lut = ts_to_ldos_lut(names)
        ldos = lut[np.clip(ts, 0, len(lut) - 1)].astype(np.uint8)
    else:
        gm = sitk.GetArrayFromImage(_resample(anatomy["gm"], ref, tx, sitk.sitkLinear, 0.0))
        wm = sitk.GetArrayFromImage(_resample(anatomy["wm"], ref, tx, sitk.sitkLinear, 0.0))
        act[ts == 5] = suv("scalp")
        act[ts == 4] = suv("skull")
        act[ts == 3] = suv("csf")
        inside = (ts >= 1) & (ts <= 3)
        act[inside] = (gm * suv("grey_matter") + wm * suv("white_matter") +
                       np.clip(1 - gm - wm, 0, 1) * suv("csf"))[inside]
        ldos[(ts == 1) | (ts == 2)] = 13
    # smooth intra-organ heterogeneity (+-10 %)
    act *= _smooth_field(act.shape, np.random.default_rng(patient["field_seed"]), amp=0.08)
    # lesions: ellipsoids defined in anatomy space, mapped through the patient transform
    les = np.zeros(ct.shape, np.uint8)
    if patient["lesions"]:
        u = sitk.GetArrayFromImage(sitk.Resample(tx.GetDisplacementField(), ref, sitk.Transform(), sitk.sitkLinear))
        zz, yy, xx = np.meshgrid(*[np.arange(s) for s in ct.shape], indexing="ij")
        d = np.array(ref.GetDirection()).reshape(3, 3)
        idx = np.stack([xx, yy, zz], -1).astype(np.float64) * np.array(ref.GetSpacing())
        pts = np.array(ref.GetOrigin()) + idx @ d.T + u
        body = ct > -500
        for L in patient["lesions"]:
            q = (pts - np.array(L["center_mm"])) / np.array(L["radii_mm"])
            m = (np.sum(q * q, axis=-1) <= 1.0) & body
            les[m] = L["index"]
            act[m] = L["suv"].get(tracer, LESION_SUV[tracer][0])
    mu = hu_to_mu(ct)
    return dict(suv=act, ct=ct.astype(np.float32), ldos=ldos, lesions=les, mu=mu)


# --------------------------------------------------------------------------------------------------------------
# Acquisition + reconstruction
# --------------------------------------------------------------------------------------------------------------
def _normalisation(sino_shape, key, spread=0.08):
    """Fixed per-centre detector-pair efficiency pattern (per view and bin, same for every slice)."""
    rng = _rng_for(0, "norm", key)
    na, nb = sino_shape[1:]
    eff = rng.uniform(1 - spread, 1 + spread, (na, nb)) * rng.uniform(1 - spread / 2, 1 + spread / 2, (1, nb))
    return torch.from_numpy(eff.astype(np.float32))[None]


def acquire(system: PETSystem, suv: np.ndarray | torch.Tensor, counts_true: float, seed: int | np.random.Generator,
            scatter_fraction: float = 0.3, randoms_fraction: float = 0.1, noiseless: bool = False) -> dict:
    """Expected trues, additive randoms+scatter and Poisson prompts for an SUV image.

    Returns dict(prompts, additive, scale) with ``scale`` = counts per (SUV * unit of the system model), so that
    reconstructed images divided by ``scale`` are in SUV. ``noiseless``: prompts are the expected counts (not
    integers, not a measurement).
    """
    trues_unit = system.forward(torch.as_tensor(suv))
    tot = float(trues_unit.sum())
    if not tot > 0:
        raise InputError("the activity image projects to zero counts")
    if not counts_true > 0:
        raise InputError(f"count level must be > 0, got {counts_true}")
    scale = float(counts_true) / tot
    trues = trues_unit * scale
    # scatter: trues blurred strongly along the radial direction (~ 10 cm FWHM), randoms: flat per slice
    sc = gaussian_filter_3d(trues, (0.0, 0.0, 100.0), (1.0, 1.0, system.proj.bin_mm))
    sc = sc * (scatter_fraction / (1 - scatter_fraction)) * float(trues.sum()) / max(float(sc.sum()), 1e-12)
    rnd = torch.ones_like(trues) * (randoms_fraction * float(trues.sum()) / trues.numel())
    additive = sc + rnd
    prompts = (trues + additive) if noiseless else poisson_sample(trues + additive, seed)
    return dict(prompts=prompts, additive=additive, scale=scale)


def _image(arr, ref, dtype=None):
    im = sitk.GetImageFromArray(np.ascontiguousarray(arr if dtype is None else arr.astype(dtype)))
    im.CopyInformation(ref)
    return im


def simulate_case(anatomy: dict, patient: dict, profile: dict, tracer: str = "FDG", drfs: Sequence[float] = (12,),
                  seed: int = 0, max_slices: int | None = None, max_voxels: int | None = None,
                  device: str | torch.device = "cpu", progress: Callable[[float, str], None] | None = None,
                  cancel: Callable[[], bool] | None = None, noiseless: bool = False) -> dict:
    """Simulate one scan of ``patient`` at a centre: full dose + one OSEM image per DRF (binomial thinning).

    Returns dict(images={"full_dose": Image, "drf<d>": Image, "ct", "labels", "lesions"}, info={...}).
    ``noiseless=True`` reconstructs the expected data instead of Poisson counts (low doses: expected counts / DRF):
    the noise-free reconstruction, a reference for what denoising can at best recover, not a scan.
    """
    rep = Reporter(progress, cancel)
    drfs = [check_drf(d) for d in drfs]
    ref = center_grid(anatomy, profile, patient["axial_u"], max_slices, max_voxels)
    rep(0.02, "ground truth")
    gt = truth_on_grid(anatomy, patient, ref, tracer)
    sp = ref.GetSpacing()
    spacing_zyx = (sp[2], sp[1], sp[0])
    shape = gt["suv"].shape
    rep(0.1, "system model")
    cache_key = (shape, spacing_zyx, profile["n_subsets"], str(device))
    proj = _PROJ_CACHE.get(cache_key)
    sys_ = PETSystem(shape, spacing_zyx, psf_fwhm_mm=profile["psf_fwhm_mm"], mu=gt["mu"],
                     n_subsets=profile["n_subsets"], device=device, projector=proj)
    _PROJ_CACHE.clear()
    _PROJ_CACHE[cache_key] = sys_.proj
    sys_.mult = sys_.mult * _normalisation(sys_.sino_shape, profile.get("name", "centre")).to(sys_.device)
    counts = profile["counts_per_cm"] * shape[0] * spacing_zyx[0] / 10.0
    rng = _rng_for(seed, patient["key"], tracer, profile.get("name", ""))
    acq = acquire(sys_, gt["suv"], counts, rng, noiseless=noiseless)
    sens = sensitivity(sys_)
    n_rec = 1 + len(drfs)
    kw = dict(n_iter=profile["n_iter"], post_filter_fwhm_mm=profile["post_filter_mm"], sens=sens)
    full = osem(sys_, acq["prompts"], acq["additive"], progress=rep.sub(0.15, 0.15 + 0.85 / n_rec), **kw)
    images = {"full_dose": _image((full / acq["scale"]).cpu().numpy().astype(np.float32), ref)}
    info = dict(prompts=float(acq["prompts"].sum()), scale=acq["scale"], shape=list(shape), spacing=list(sp))
    for i, d in enumerate(drfs):
        low = acq["prompts"] / d if noiseless else thin_counts(acq["prompts"], d, rng)
        a = 0.15 + 0.85 * (i + 1) / n_rec
        rec = osem(sys_, low, acq["additive"] / d, progress=rep.sub(a, a + 0.85 / n_rec), **kw)
        images[f"drf{d:g}"] = _image((rec * d / acq["scale"]).cpu().numpy().astype(np.float32), ref)
        info[f"prompts_drf{d:g}"] = float(low.sum())
    images["ct"] = _image(gt["ct"].astype(np.int16), ref)
    images["labels"] = _image(gt["ldos"], ref)
    images["lesions"] = _image(gt["lesions"], ref)
    images["suv_true"] = _image(gt["suv"], ref)
    rep(1.0, "case done")
    return dict(images=images, info=info)


_PROJ_CACHE = {}

MANIFEST_COLUMNS = ["case_id", "patient_id", "center", "known", "tracer", "drf", "split", "full_dose", "low_dose",
                    "low_dose_drf20", "ct", "labels", "lesions", "spacing_mm", "units"]


def _plan(n_patients, centers, tracers, n_test, n_unknown, second_tracer_every):
    plan = []
    for cname in centers:
        prof = CENTERS[cname]
        n = n_patients if prof["known"] else n_unknown
        for p in range(n):
            split = "test" if (not prof["known"] or p >= n - n_test) else "train"
            trs = [tracers[0]]
            for t in tracers[1:]:
                if prof["region"] == "whole_body":
                    if second_tracer_every <= 1 or p % second_tracer_every == 0:
                        trs.append(t)
            for t in trs:
                plan.append((cname, p, t, split))
    return plan


def generate_dataset(out_dir: str | Path, n_patients: int, centers: Sequence[str] | None = None,
                     tracers: Sequence[str] = ("FDG",), extra_drfs: Sequence[float] = (20,), seed: int = 0,
                     progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None,
                     n_test: int | None = None, n_unknown: int | None = None, second_tracer_every: int = 1,
                     max_slices: int | None = 110, max_voxels: int | None = 2_500_000,
                     device: str | torch.device = "cpu", anatomy_dir: str | Path | None = None,
                     resume: bool = False) -> Path:
    """Write a multi-center data set and return the path of its ``manifest.csv``.

    ``n_patients`` per known centre (the last ``n_test`` of them, default 25 % rounded up, are test patients);
    ``n_unknown`` patients (default ``n_test``) per unknown centre, all test.  Every patient gets ``tracers[0]``;
    further tracers are added for every ``second_tracer_every``-th patient of whole-body centres.  Each case has
    full_dose, low_dose (centre DRF), low_dose_drf<d> for ``extra_drfs``, ct, labels (LDOS-18), lesions
    (instance labels) and suv_true, all on the centre grid (images in SUV).
    """
    rep = Reporter(progress, cancel)
    centers = list(centers) if centers else list(CENTERS)
    for c in centers:
        if c not in CENTERS:
            raise InputError(f"unknown centre {c!r}; known profiles: {', '.join(CENTERS)}")
    tracers = tuple(tracers)
    for t in tracers:
        if t not in TRACERS:
            raise InputError(f"unknown tracer {t!r}; choose from {', '.join(TRACERS)}")
    if int(n_patients) < 1:
        raise InputError(f"number of patients must be >= 1, got {n_patients}")
    extra = [check_drf(d) for d in extra_drfs]
    n_test = int(math.ceil(0.25 * n_patients)) if n_test is None else int(n_test)
    n_unknown = max(1, n_test) if n_unknown is None else int(n_unknown)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(int(n_patients), centers, tracers, n_test, n_unknown, int(second_tracer_every))
    rows = []
    patients = {}
    t0 = time.time()
    for i, (cname, p, tracer, split) in enumerate(plan):
        sub = rep.sub(i / len(plan), (i + 1) / len(plan))
        sub(0.0, f"{cname} patient {p} {tracer}")
        prof = dict(CENTERS[cname], name=cname)
        anatomy = load_anatomy(prof["region"], anatomy_dir)
        pid = f"{cname}_p{p:03d}"
        if pid not in patients:
            patients[pid] = make_patient(anatomy, seed, pid, tracers=TRACERS, with_lesions=prof["lesions"])
        pat = patients[pid]
        case = f"{pid}_{tracer}"
        cdir = out / case
        if resume and (cdir / "case.json").exists():
            try:
                meta = json.loads((cdir / "case.json").read_text())
                rows.append({k: meta[k] for k in meta if k not in ("profile", "lesions_info", "acquisition",
                                                                  "seed")})
                continue
            except (ValueError, KeyError):
                pass
        cdir.mkdir(exist_ok=True)
        drfs = [prof["drf"]] + [d for d in extra if d != prof["drf"]]
        res = simulate_case(anatomy, pat, prof, tracer, drfs, seed=seed, max_slices=max_slices,
                            max_voxels=max_voxels, device=device, progress=sub)
        files = {}
        for k, im in res["images"].items():
            name = {"full_dose": "full_dose", f"drf{float(prof['drf']):g}": "low_dose"}.get(k, k)
            if name.startswith("drf"):
                name = "low_dose_" + name
            fn = cdir / f"{name}.nii.gz"
            write_image(im, fn)
            files[name] = fn.relative_to(out).as_posix()
        for d in extra:
            if d == prof["drf"]:
                files[f"low_dose_drf{d:g}"] = files["low_dose"]
        if "low_dose_drf20" not in files:
            files["low_dose_drf20"] = ""
        sp = res["images"]["full_dose"].GetSpacing()
        row = dict(case_id=case, patient_id=pid, center=cname, known=int(prof["known"]), tracer=tracer,
                   drf=f"{float(prof['drf']):g}", split=split, full_dose=files["full_dose"],
                   low_dose=files["low_dose"], low_dose_drf20=files["low_dose_drf20"], ct=files["ct"],
                   labels=files["labels"], lesions=files["lesions"], spacing_mm="x".join(f"{s:g}" for s in sp),
                   units="SUV")
        for k, v in files.items():
            if k.startswith("low_dose_drf") and k not in row:
                row[k] = v
        row["suv_true"] = files.get("suv_true", "")
        row["n_lesions"] = len(pat["lesions"]) if prof["lesions"] else 0
        rows.append(row)
        meta = dict(row, profile=prof, lesions_info=[dict(L, suv=L["suv"].get(tracer)) for L in pat["lesions"]],
                    acquisition=res["info"], seed=seed)
        write_json(meta, cdir / "case.json")
    cols = list(MANIFEST_COLUMNS)
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    man = write_csv([{k: r.get(k, "") for k in cols} for r in rows], out / "manifest.csv", cols)
    write_json(dict(n_cases=len(rows), centers={c: dict(CENTERS[c]) for c in centers}, tracers=list(tracers),
                    extra_drfs=[float(d) for d in extra], seed=seed, organs=LDOS_ORGANS, units="SUV",
                    seconds=round(time.time() - t0, 1)), out / "dataset.json")
    rep(1.0, f"{len(rows)} cases written")
    return man


def reproduce_case(case_dir: str | Path, noiseless: bool = False, anatomy: dict | None = None,
                   progress: Callable[[float, str], None] | None = None,
                   cancel: Callable[[], bool] | None = None) -> dict:
    """Simulate a case of a generated data set again from its ``case.json`` (same patient, centre, grid, seed;
    the same images up to floating-point differences, e.g. of another thread count).

    With ``noiseless=True`` this gives the case's noise-free reconstruction (see :func:`simulate_case`).
    The axial window is the one of the case's full-dose image; a case whose grid cannot be reproduced (another
    anatomy, another generator) raises InputError. Returns :func:`simulate_case`'s dict.
    """
    case_dir = Path(case_dir)
    try:
        meta = json.loads((case_dir / "case.json").read_text())
        prof, pid, tracer, seed = dict(meta["profile"]), meta["patient_id"], meta["tracer"], int(meta["seed"])
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{case_dir} has no readable case.json of a generated data set ({exc})") from exc
    if prof.get("name") not in CENTERS:
        raise InputError(f"{case_dir}: unknown centre profile {prof.get('name')!r}")
    if anatomy is None:
        anatomy = load_anatomy(prof["region"])
    try:
        ref = sitk.ReadImage(str(case_dir / Path(meta["full_dose"]).name))
    except RuntimeError as exc:
        raise InputError(f"{case_dir}: cannot read the case's full-dose image ({exc})") from exc
    pat = make_patient(anatomy, seed, pid, tracers=TRACERS, with_lesions=prof["lesions"])
    res = simulate_case(anatomy, pat, prof, tracer, [prof["drf"]], seed=seed, max_slices=ref.GetSize()[2],
                        progress=progress, cancel=cancel, noiseless=noiseless)
    new = res["images"]["full_dose"]
    if new.GetSize() != ref.GetSize() or not np.allclose(new.GetOrigin(), ref.GetOrigin(), atol=1e-3) or \
            not np.allclose(new.GetSpacing(), ref.GetSpacing()):
        raise InputError(f"{case_dir}: the simulation does not reproduce the case's grid (other anatomy or generator "
                         f"settings)")
    return res


STANDARD_SET = dict(patients=8, tracers=("FDG", "FAPI"), extra_drfs=(20,), n_test=2, n_unknown=2,
                    second_tracer_every=2, max_slices=110, max_voxels=1_800_000)


def generate_standard_set(out_dir: str | Path, seed: int = 0, progress: Callable[[float, str], None] | None = None,
                          cancel: Callable[[], bool] | None = None, resume: bool = True) -> Path:
    """The standard training/test set: 6 train + 2 test patients per known centre (FDG; FAPI for every second
    patient), 2 test patients per unknown centre; extra DRF 20 for every case."""
    s = STANDARD_SET
    return generate_dataset(out_dir, s["patients"], centers=list(CENTERS), tracers=s["tracers"],
                            extra_drfs=s["extra_drfs"], seed=seed, n_test=s["n_test"], n_unknown=s["n_unknown"],
                            second_tracer_every=s["second_tracer_every"], progress=progress, cancel=cancel,
                            max_slices=s["max_slices"], max_voxels=s["max_voxels"], resume=resume)


def standard_set_key(seed: int = 0) -> str:
    """What the standard set is made from, as 12 hex digits: its settings, the centre profiles, the tissue uptake
    table, the generator's source files and the anatomy's checksum. A change of any of them is another set."""
    import inspect
    from PETWorkbenchLib.models import sha256_of
    from . import lowdose, organs, osem, projector
    h = hashlib.sha256()
    h.update(json.dumps({"settings": STANDARD_SET, "seed": seed, "centers": CENTERS, "suv": SUV_TABLE},
                        sort_keys=True, default=str).encode())
    for mod in (sys.modules[__name__], lowdose, organs, osem, projector):
        h.update(inspect.getsource(mod).encode())
    h.update(sha256_of(body_anatomy_dir() / "example_ct.nii.gz").encode())
    return h.hexdigest()[:12]


def ensure_standard_set(cache_root: str | Path | None = None, seed: int = 0,
                        progress: Callable[[float, str], None] | None = None,
                        cancel: Callable[[], bool] | None = None) -> Path:
    """manifest.csv of the standard set in ``<cache_root>/<standard_set_key>/`` (default ``<repo>/.cache/simdata``),
    generated (resumably) when missing or incomplete: what benchmarks and training use on a fresh clone."""
    root = Path(cache_root) if cache_root else Path(__file__).resolve().parents[2] / ".cache" / "simdata"
    out = root / standard_set_key(seed)
    done = out / "dataset.json"
    if done.is_file() and (out / "manifest.csv").is_file():
        return out / "manifest.csv"
    return generate_standard_set(out, seed=seed, progress=progress, cancel=cancel, resume=True)
