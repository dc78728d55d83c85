#!/usr/bin/env python
"""Registration benchmark: weight-free instance optimisation (ours) against ANTs SyN (antspyx) on real images.

Cases
1. CT: the real abdominal CT of ``totalsegmentator_example_ct`` (3 mm) is warped by a known smooth deformation
   (breathing-like superior-inferior/anterior-posterior motion plus local Gaussian bumps, no folding); its
   TotalSegmentator labels are warped with it.  Fixed = warped CT (+ noise), moving = original CT.  The true
   pull-back field is therefore known exactly on the fixed grid.
2. MNI: nilearn's MNI152 T1 template (2 mm) with a known deformation of the same kind; labels = GM/WM/CSF-like
   classes from the nilearn tissue templates.
3. 2D: the real brain slices of ``antspy_2d_brain_slices`` (different subjects, no ground truth): NCC inside the
   fixed brain and folding; ours with affine pre-alignment and the diffeomorphic (SVF) mode.

The last printed line is ``key=value`` pairs for the CT case:
disp_true_vox disp_err_vox dice_before dice_ours dice_peer fold_pct time_ours_s time_peer_s.

Settings.  Ours: NIO schedule iterations (100, 60, 30), LNCC, diffusion implicit regulariser, smoothness 1, no
pre-alignment (the pairs share a frame); ``--quick`` stops the pyramid at half resolution (``final_scale=2``).
Peer: ANTs SyN, deformable only, with the ANTs authors' presets ``antsRegistrationSyN[so]`` (CC) or, with
``--quick``, ``antsRegistrationSyNQuick[so]`` (MI).  Times are wall-clock seconds in this process (CPU seconds
are printed too).

Usage: python benchmarks/registration.py [--quick] [--threads 2] [--torch-threads 1] [--no-peer]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "RegistrationModule"))
DATA = Path(os.environ.get("PETWORKBENCH_DATA", ROOT.parent / "shared" / "data"))
CACHE = ROOT / ".cache" / "registration"


from RegistrationModuleLib.synthetic import body_mask, known_deformation, warp_with


# --------------------------------------------------------------------------------------------- peer
def ants_syn(fixed, moving, quick=False, threads=2):
    """ANTs SyN with the ANTs authors' own presets, deformable only (the pairs already share a frame):
    ``antsRegistrationSyN[so]`` (CC radius 2, 100x70x50x20 at shrink 8x4x2x1) or, with ``quick``,
    ``antsRegistrationSyNQuick[so]`` (MI 32 bins, 100x70x50x0)."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants

    def to_ants(img):
        nd = img.GetDimension()
        return ants.from_numpy(sitk.GetArrayFromImage(img).T.astype(np.float32), origin=list(img.GetOrigin()),
                               spacing=list(img.GetSpacing()),
                               direction=np.asarray(img.GetDirection()).reshape(nd, nd))
    f, m = to_ants(fixed), to_ants(moving)
    preset = "antsRegistrationSyNQuick[so]" if quick else "antsRegistrationSyN[so]"
    with tempfile.TemporaryDirectory() as tmp:
        t, c = time.perf_counter(), time.process_time()
        out = ants.registration(f, m, type_of_transform=preset, outprefix=os.path.join(tmp, "syn_"))
        dt, dc = time.perf_counter() - t, time.process_time() - c
        field = sitk.ReadImage(out["fwdtransforms"][0])
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    return field, dt, dc


def warp_field(img, field, label=False):
    tx = sitk.DisplacementFieldTransform(sitk.Image(field))
    default = 0.0 if label else float(sitk.GetArrayViewFromImage(img).min())
    return sitk.Resample(img, field, tx, sitk.sitkNearestNeighbor if label else sitk.sitkLinear, default,
                         img.GetPixelID())


def ncc(a, b, mask=None):
    a = sitk.GetArrayFromImage(a).astype(np.float64)
    b = sitk.GetArrayFromImage(b).astype(np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# --------------------------------------------------------------------------------------------- cases
def run_case(name, fixed, moving, flab, mlab, u_true, body, voxel, args, ours_kw):
    from RegistrationModuleLib import register
    from RegistrationModuleLib.metrics import dice, folding, hd95
    out = {}
    _, out["dice_before"] = dice(flab, mlab)
    t, c = time.perf_counter(), time.process_time()
    res = register(fixed, moving, **ours_kw)
    out["time_ours_s"] = time.perf_counter() - t
    out["cpu_ours_s"] = time.process_time() - c
    u = sitk.GetArrayFromImage(res.displacement)
    out["disp_true_vox"] = float(np.linalg.norm(u_true, axis=-1)[body].mean() / voxel)
    out["disp_err_vox"] = float(np.linalg.norm(u - u_true, axis=-1)[body].mean() / voxel)
    warped_lab = res.warp(mlab, is_label=True)
    _, out["dice_ours"] = dice(flab, warped_lab)
    _, out["hd95_ours_mm"] = hd95(flab, warped_lab)
    fo = folding(res.displacement)
    out["fold_pct"] = fo["folding_pct"]
    out["std_log_j"] = fo["std_log_j"]
    out["fold_pct_body"] = folding(res.displacement, body.astype(np.uint8))["folding_pct"]
    if not args.no_peer:
        field, out["time_peer_s"], out["cpu_peer_s"] = ants_syn(fixed, moving, args.quick, args.threads)
        up = sitk.GetArrayFromImage(field)
        out["disp_err_peer_vox"] = float(np.linalg.norm(up - u_true, axis=-1)[body].mean() / voxel)
        wl = warp_field(mlab, field, label=True)
        _, out["dice_peer"] = dice(flab, wl)
        _, out["hd95_peer_mm"] = hd95(flab, wl)
        out["fold_pct_peer"] = folding(field)["folding_pct"]
    print(name + ": " + " ".join(f"{k}={v:.4g}" for k, v in out.items()), flush=True)
    return out


def ct_case(args, ours_kw):
    d = DATA / "totalsegmentator_example_ct"
    ct = sitk.ReadImage(str(d / "example_ct.nii.gz"), sitk.sitkFloat32)
    lab = sitk.ReadImage(str(d / "example_seg_fast_force_split.nii.gz"), sitk.sitkUInt8)
    lab.CopyInformation(ct)
    body = body_mask(ct)
    u_true = known_deformation(ct, body, amp_si=14.0, amp_ap=5.0, bumps=5, bump_amp=8.0, bump_sigma=30.0)
    fixed = warp_with(ct, u_true, ct)
    rng = np.random.default_rng(1)
    fa = sitk.GetArrayFromImage(fixed)
    fa = fa + rng.normal(0, 10.0, fa.shape).astype(np.float32)      # 10 HU noise on the fixed image
    fixed2 = sitk.GetImageFromArray(fa)
    fixed2.CopyInformation(ct)
    flab = warp_with(lab, u_true, ct, label=True)
    return run_case("ct", fixed2, ct, flab, lab, u_true, body, float(np.mean(ct.GetSpacing())), args, ours_kw)


def mni_case(args, ours_kw):
    from nilearn import datasets
    CACHE.mkdir(parents=True, exist_ok=True)
    t1p, labp = CACHE / "mni152_t1_2mm.nii.gz", CACHE / "mni152_tissue_2mm.nii.gz"
    if not labp.exists():
        import nibabel as nib
        t1 = datasets.load_mni152_template(resolution=2)
        gm = datasets.load_mni152_gm_template(resolution=2).get_fdata()
        wm = datasets.load_mni152_wm_template(resolution=2).get_fdata()
        brain = datasets.load_mni152_brain_mask(resolution=2).get_fdata() > 0
        lab = np.zeros(gm.shape, np.uint8)
        lab[brain] = 3                                                   # CSF / other inside the brain mask
        lab[(gm > 0.5) & (gm >= wm)] = 1
        lab[(wm > 0.5) & (wm > gm)] = 2
        nib.save(nib.Nifti1Image(np.asarray(t1.get_fdata(), np.float32), t1.affine), str(t1p))
        nib.save(nib.Nifti1Image(lab, t1.affine), str(labp))
    t1 = sitk.ReadImage(str(t1p), sitk.sitkFloat32)
    lab = sitk.ReadImage(str(labp), sitk.sitkUInt8)
    body = sitk.GetArrayFromImage(t1) > 0.1 * float(sitk.GetArrayViewFromImage(t1).max())
    from scipy import ndimage
    body = ndimage.binary_fill_holes(body)
    u_true = known_deformation(t1, body, amp_si=8.0, amp_ap=3.0, bumps=4, bump_amp=6.0, bump_sigma=18.0, seed=3)
    fixed = warp_with(t1, u_true, t1)
    flab = warp_with(lab, u_true, t1, label=True)
    return run_case("mni", fixed, t1, flab, lab, u_true, body, 2.0, args, ours_kw)


def slices_case(args, ours_kw):
    from RegistrationModuleLib import register
    from RegistrationModuleLib.metrics import folding
    d = DATA / "antspy_2d_brain_slices"
    pairs = [("r16", "r64"), ("r27", "r85")] if args.quick else [("r16", "r64"), ("r27", "r85"), ("r30", "r62")]
    rows = []
    for a, b in pairs:
        f = sitk.Cast(sitk.ReadImage(str(d / f"{a}slice.jpg")), sitk.sitkFloat32)
        m = sitk.Cast(sitk.ReadImage(str(d / f"{b}slice.jpg")), sitk.sitkFloat32)
        mask = sitk.GetArrayFromImage(f) > 0
        t = time.perf_counter()
        res = register(f, m, **ours_kw)
        row = {"ncc_before": ncc(f, m, mask), "ncc_ours": ncc(f, res.warp(m), mask),
               "fold_pct_ours": folding(res.displacement)["folding_pct"], "time_ours_s": time.perf_counter() - t}
        if not args.no_peer:
            field, row["time_peer_s"], row["cpu_peer_s"] = ants_syn(f, m, args.quick, args.threads)
            row["ncc_peer"] = ncc(f, warp_field(m, field), mask)
            row["fold_pct_peer"] = folding(field)["folding_pct"]
        print(f"2d {a}->{b}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CT + MNI + two 2D pairs (< 10 min on 2 cores)")
    p.add_argument("--threads", type=int, default=2, help="ITK/ANTs threads (default 2)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads for ours (default 1: torch's OpenMP threads stall when the 2 cores are "
                        "shared with other work; 1 thread is the slower choice on an idle machine)")
    p.add_argument("--no-peer", action="store_true", help="skip ANTs")
    p.add_argument("--cases", default="ct,mni,2d")
    p.add_argument("--smoothness", type=float, default=None)
    p.add_argument("--iterations", default=None, help="e.g. 100,60,30")
    p.add_argument("--similarity", default="lncc")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.torch_threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    # quick: the finest optimisation level is half resolution (field upsampled), full: full resolution
    kw = {"similarity": args.similarity, "prealign": "none", "device": "cpu", "final_scale": 2 if args.quick else 1}
    if args.smoothness is not None:
        kw["smoothness"] = args.smoothness
    if args.iterations:
        kw["iterations"] = tuple(int(i) for i in args.iterations.split(","))
    cases = args.cases.split(",")
    ct = ct_case(args, kw) if "ct" in cases else None
    if "mni" in cases:
        mni_case(args, kw)
    if "2d" in cases:
        # different subjects: affine first, then a diffeomorphic (SVF) field, like SyN
        slices_case(args, dict(kw, prealign="affine", diffeomorphic=True))
    if ct is not None:
        keys = ["disp_true_vox", "disp_err_vox", "dice_before", "dice_ours", "dice_peer", "fold_pct",
                "time_ours_s", "time_peer_s"]
        print(" ".join(f"{k}={ct.get(k, float('nan')):.4f}" for k in keys))


if __name__ == "__main__":
    main()
