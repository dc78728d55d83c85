#!/usr/bin/env python
"""Registration benchmark: the weight-free engine with its defaults against classical peers, in one run.

Cases (the known pull-back field ``u`` is exact: ``x_moving = x_fixed + u(x_fixed)``)
1. ``mni``: nilearn's MNI152 T1 template at 2 mm; labels GM = 1 / WM = 2 (nilearn's tissue templates > 0.5, the
   larger one wins, inside the brain mask); error mask = nilearn's brain mask.
2. ``ct``: the real abdomen CT of ``totalsegmentator_example_ct`` (3 mm, from a Biograph mCT PET/CT; see the
   shared data README) with its TotalSegmentator organ labels (``example_seg_fast_force_split``); error mask = the
   body (largest component above -500 HU, holes filled).
   Field of both: 6 Gaussian bumps (sigma 25 mm) centred on voxels of the mask drawn by
   ``numpy.random.default_rng(0)``, each with a random unit direction and a random amplitude in [0.5, 1], the sum
   scaled so that its largest magnitude is 8 mm.  Fixed = the image, moving = the image warped by the inverse field
   (``moving(x + u(x)) = fixed(x)``; inverse by fixed-point iteration to < 1e-3 mm), labels likewise (nearest).
   ``ct_noise``, ``mni_noise`` (opt in with ``--cases``; not in the last line): the same pairs with independent
   Gaussian noise added to fixed and moving (CT 10 HU, MNI 0.02 of the template's 0-1 range; ``default_rng(1)``):
   in the plain cases the static part of the moving image is a sample-exact copy of the fixed one, noise
   included, which two acquisitions never are.
3. ``petct``: the demo's PET -> CT case: the main job's simulate + synthesize steps on the sample anatomy (seed 0);
   fixed = the CT acquired with a known breathing-like misalignment, moving = the synthesized PET; registered
   with the main job's settings (``RegistrationModuleLib.petct.register_pet_to_ct``); error = mean |u - u_true| in the
   body, mm.

Methods (times are wall-clock seconds of the registration call only, all in this run, on the same load)
* ``ours``: ``RegistrationModuleLib.register(fixed, moving)`` with the defaults a new user gets (the same as
  ``petworkbench register fixed moving -o field``), on the CPU.
* ``ants``: ANTs SyN with antspyx's defaults (``ants.registration(f, m, "SyN")``: affine + SyN, MI then CC).
* ``elastix``: itk-elastix, B-spline, AdvancedNormalizedCorrelation, 8192 random samples, 1000 iterations per
  level, final grid 16 mm (the default B-spline map otherwise: 4 levels, ASGD).  Deformable only.
* ``fireants``: FireANTs greedy (CC; scales 4/2/1, iterations 200/100/50, CC window 5, Adam lr 0.5, the settings
  of its README), run by the interpreter of ``--fireants-python`` in a subprocess.  FireANTs pins an old SimpleITK
  and carries its own licence, so it lives in its own venv and never enters the project's environment::

      python3 -m venv .cache/bench-venv-fireants
      .cache/bench-venv-fireants/bin/pip install -c constraints.txt torch==2.13.0 numpy scipy SimpleITK nibabel tqdm
      .cache/bench-venv-fireants/bin/pip install --no-deps fireants

  (itk-elastix goes into the project's venv: ``pip install -c constraints.txt itk-elastix``, the ``[bench]``
  extra; it changes neither torch, SimpleITK nor numpy.)
A peer that is not installed is reported in one line and skipped (its keys are nan).

Metrics per case and method: mean displacement error inside the mask (voxels), also split into the static part of
the mask (true displacement below 0.05 voxel; ``static_pct`` of it) and the moving rest, because the two cases
differ there (80 % of the CT body does not move; METHOD.md), mean label Dice, % folded voxels (det J <= 0 over the
whole grid), wall time.  A peer's displacement is read convention-free: its transform
resamples images of the physical coordinates (linear, exact for a linear function).

Last line: ``mni_err_ours mni_err_best_peer mni_time_ours_s mni_time_best_peer_s mni_time_ants_s ct_err_ours
ct_err_best_peer ct_time_ours_s ct_time_best_peer_s fold_pct_ours petct_err_before_mm petct_err_ours_mm``
(best peer = the peer with the lowest error in this run; fold_pct_ours = the largest over the cases).

Usage: python benchmarks/registration.py [--quick] [--threads 2] [--cases mni,ct,petct[,ct_noise,mni_noise]]
[--methods ...] [--petct-seeds 0,1,2]
``--quick`` skips nothing but runs elastix with 250 iterations per level (< 15 min on 2 cores); the full run uses
the 1000 iterations above.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
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
FIREANTS_PY = ROOT / ".cache" / "bench-venv-fireants" / "bin" / "python"
PEERS = ("ants", "elastix", "fireants")

from RegistrationModuleLib.synthetic import body_mask  # noqa: E402 - after the sys.path set-up above


# --------------------------------------------------------------------------------------------- known fields
def physical_points(ref: sitk.Image) -> np.ndarray:
    shape = sitk.GetArrayViewFromImage(ref).shape
    nd = ref.GetDimension()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")[::-1], -1).astype(np.float64)
    D = np.asarray(ref.GetDirection()).reshape(nd, nd)
    return np.asarray(ref.GetOrigin()) + (idx * np.asarray(ref.GetSpacing())) @ D.T


def bump_field(ref: sitk.Image, mask: np.ndarray, n: int = 6, sigma: float = 25.0, max_mm: float = 8.0,
               seed: int = 0) -> np.ndarray:
    """Sum of ``n`` Gaussian bumps (centres on mask voxels, random directions and amplitudes), scaled to a largest
    magnitude of ``max_mm``: LPS mm, array (*spatial, 3)."""
    rng = np.random.default_rng(seed)
    x = physical_points(ref)
    inside = np.argwhere(mask)
    u = np.zeros_like(x)
    for _ in range(n):
        p = x[tuple(inside[rng.integers(len(inside))])]
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        a = rng.uniform(0.5, 1.0)
        g = np.exp(-0.5 * np.sum((x - p) ** 2, -1) / sigma ** 2)
        u += a * g[..., None] * d
    return u * (max_mm / np.linalg.norm(u, axis=-1).max())


def _field_img(u, ref):
    img = sitk.GetImageFromArray(np.ascontiguousarray(u, np.float64), isVector=True)
    img.CopyInformation(ref)
    return img


def invert_field(u: np.ndarray, ref: sitk.Image, iterations: int = 60) -> np.ndarray:
    """Pull-back field ``v`` of the inverse map: ``y + v(y) = phi^-1(y)`` for ``phi(x) = x + u(x)``; fixed point
    ``v(y) = -u(y + v(y))`` (converges for a contraction: |grad u| < 1)."""
    v = -u.copy()
    for _ in range(iterations):
        tx = sitk.DisplacementFieldTransform(_field_img(v, ref))
        comps = []
        for c in range(3):
            ci = sitk.GetImageFromArray(np.ascontiguousarray(u[..., c], np.float64))
            ci.CopyInformation(ref)
            comps.append(sitk.GetArrayFromImage(sitk.Resample(ci, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat64)))
        v_new = -np.stack(comps, -1)
        step = np.abs(v_new - v).max()
        v = v_new
        if step < 1e-4:
            break
    return v


def warp_with(img, v, ref, label=False):
    tx = sitk.DisplacementFieldTransform(_field_img(v, ref))
    default = 0.0 if label else float(sitk.GetArrayViewFromImage(img).min())
    return sitk.Resample(img, ref, tx, sitk.sitkNearestNeighbor if label else sitk.sitkLinear, default,
                         img.GetPixelID())


def make_case(img, lab, mask, name):
    u = bump_field(img, mask)
    v = invert_field(u, img)
    fixed, flab = img, lab
    moving = warp_with(img, v, img)
    mlab = warp_with(lab, v, img, label=True)
    # check of the construction: the exact answer warps the moving image back onto the fixed one
    back = sitk.GetArrayFromImage(warp_with(moving, u, img))
    f = sitk.GetArrayFromImage(fixed)
    rel = float(np.abs(back - f)[mask].mean() / (np.abs(f[mask] - f[mask].mean()).mean() + 1e-9))
    print(f"{name}: size {img.GetSize()} spacing {img.GetSpacing()} true field mean "
          f"{np.linalg.norm(u, axis=-1)[mask].mean():.2f} mm max {np.linalg.norm(u, axis=-1).max():.2f} mm; "
          f"moving warped back by the true field differs from fixed by {100 * rel:.2f} % (interpolation)",
          flush=True)
    return {"name": name, "fixed": fixed, "moving": moving, "fixed_labels": flab, "moving_labels": mlab,
            "u_true": u, "mask": mask, "voxel": float(np.mean(img.GetSpacing()))}


def mni_case():
    from nilearn import datasets
    CACHE.mkdir(parents=True, exist_ok=True)
    t1p, labp, mp = (CACHE / "mni152_t1_2mm.nii.gz", CACHE / "mni152_gmwm_2mm.nii.gz",
                     CACHE / "mni152_brainmask_2mm.nii.gz")
    if not (t1p.exists() and labp.exists() and mp.exists()):
        import nibabel as nib
        t1 = datasets.load_mni152_template(resolution=2)
        gm = datasets.load_mni152_gm_template(resolution=2).get_fdata()
        wm = datasets.load_mni152_wm_template(resolution=2).get_fdata()
        brain = datasets.load_mni152_brain_mask(resolution=2).get_fdata() > 0
        lab = np.zeros(gm.shape, np.uint8)
        lab[brain & (gm > 0.5) & (gm >= wm)] = 1
        lab[brain & (wm > 0.5) & (wm > gm)] = 2
        nib.save(nib.Nifti1Image(np.asarray(t1.get_fdata(), np.float32), t1.affine), str(t1p))
        nib.save(nib.Nifti1Image(lab, t1.affine), str(labp))
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), t1.affine), str(mp))
    t1 = sitk.ReadImage(str(t1p), sitk.sitkFloat32)
    lab = sitk.ReadImage(str(labp), sitk.sitkUInt8)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(mp))) > 0
    return make_case(t1, lab, mask, "mni")


def ct_case():
    d = DATA / "totalsegmentator_example_ct"
    ct = sitk.ReadImage(str(d / "example_ct.nii.gz"), sitk.sitkFloat32)
    lab = sitk.ReadImage(str(d / "example_seg_fast_force_split.nii.gz"), sitk.sitkUInt8)
    lab.CopyInformation(ct)
    return make_case(ct, lab, body_mask(ct), "ct")


PLAIN_CASES = {"mni": mni_case, "ct": ct_case}
# noisy variants: the plain case, the standard deviation of the added noise (image units) and how to say it
NOISY = {"ct_noise": ("ct", 10.0, "10 HU"), "mni_noise": ("mni", 0.02, "0.02 (the template spans 0-1; brain 0.4-0.9)")}


def noisy_case(name: str) -> dict:
    """A case with independent Gaussian noise (``NOISY``, ``default_rng(1)``) added to the fixed and to the moving
    image, as two acquisitions have.  In the plain cases the static part of the moving image is a sample-exact copy
    of the fixed one, noise included, which linear interpolation holds in place by its cusp at whole-voxel shifts;
    here the noise differs.  Not in the last line (opt in with ``--cases``)."""
    base, sigma, say = NOISY[name]
    case = PLAIN_CASES[base]()
    rng = np.random.default_rng(1)
    for k in ("fixed", "moving"):
        a = sitk.GetArrayFromImage(case[k])
        img = sitk.GetImageFromArray((a + rng.normal(0.0, sigma, a.shape)).astype(a.dtype))
        img.CopyInformation(case[k])
        case[k] = img
    case["name"] = name
    print(f"{name}: the {base} case with independent Gaussian noise of {say} added to fixed and moving", flush=True)
    return case


CASES = {**PLAIN_CASES, **{name: functools.partial(noisy_case, name) for name in NOISY}}


# --------------------------------------------------------------------------------------------- metrics
def coordinate_images(ref):
    x = physical_points(ref)
    out = []
    for c in range(3):
        ci = sitk.GetImageFromArray(np.ascontiguousarray(x[..., c], np.float32))
        ci.CopyInformation(ref)
        out.append(ci)
    return out, x


STATIC_VOX = 0.05   # a voxel of the mask whose true displacement is below this (voxels) counts as static


def score(case, u, seconds):
    """Error (voxels, in the mask; also split into the static part of the mask, true displacement below
    ``STATIC_VOX`` voxel, and the moving rest), Dice of the warped moving labels, % det J <= 0, time."""
    from RegistrationModuleLib.metrics import dice, folding
    ref = case["fixed"]
    mask = case["mask"]
    e = np.linalg.norm(u - case["u_true"], axis=-1)[mask] / case["voxel"]
    static = np.linalg.norm(case["u_true"], axis=-1)[mask] / case["voxel"] < STATIC_VOX
    fld = _field_img(u, ref)
    wl = warp_with(case["moving_labels"], u, ref, label=True)
    _, d = dice(case["fixed_labels"], wl)
    return {"err_vox": float(e.mean()),
            "err_static_vox": float(e[static].mean()) if static.any() else math.nan,
            "err_moving_vox": float(e[~static].mean()) if (~static).any() else math.nan,
            "static_pct": float(100 * static.mean()),
            "dice": d, "fold_pct": folding(fld)["folding_pct"], "time_s": seconds}


# --------------------------------------------------------------------------------------------- methods
def run_ours(case, threads):
    import torch

    from RegistrationModuleLib import register
    torch.set_num_threads(threads)
    t = time.perf_counter()
    res = register(case["fixed"], case["moving"], device="cpu")
    dt = time.perf_counter() - t
    return sitk.GetArrayFromImage(res.displacement), dt


def ants_image(img):
    import ants
    nd = img.GetDimension()
    return ants.from_numpy(sitk.GetArrayFromImage(img).T.astype(np.float32), origin=list(img.GetOrigin()),
                           spacing=list(img.GetSpacing()), direction=np.asarray(img.GetDirection()).reshape(nd, nd))


def run_ants(case, threads):
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants
    f, m = ants_image(case["fixed"]), ants_image(case["moving"])
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        out = ants.registration(f, m, type_of_transform="SyN", outprefix=os.path.join(tmp, "syn_"))
        dt = time.perf_counter() - t
        coords, x = coordinate_images(case["fixed"])
        y = np.stack([ants.apply_transforms(f, ants_image(c), out["fwdtransforms"]).numpy().T for c in coords], -1)
    return y - x, dt


def elastix_worker(fixed_path, moving_path, out_path, threads, iterations):
    """elastix in a child process (``--elastix-worker``): itk-elastix can crash the interpreter (seen: a
    segmentation fault with 2 threads), which must not end the benchmark."""
    import itk
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    f = itk.imread(fixed_path, itk.F)
    m = itk.imread(moving_path, itk.F)
    po = itk.ParameterObject.New()
    pm = po.GetDefaultParameterMap("bspline")
    pm["Metric"] = ["AdvancedNormalizedCorrelation"]
    pm["NumberOfSpatialSamples"] = ["8192"]
    pm["MaximumNumberOfIterations"] = [str(iterations)]
    pm["FinalGridSpacingInPhysicalUnits"] = ["16"]
    pm["WriteResultImage"] = ["false"]
    po.AddParameterMap(pm)
    t = time.perf_counter()
    _, tp = itk.elastix_registration_method(f, m, parameter_object=po, log_to_console=False,
                                            number_of_threads=threads)
    dt = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:              # transformix writes deformationField.nii there
        dfield = itk.transformix_deformation_field(m, tp, output_directory=tmp)
        np.save(out_path, np.asarray(itk.GetArrayFromImage(dfield), np.float64))
    print(json.dumps({"time_s": dt}))


def run_elastix(case, threads, quick):
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for k in ("fixed", "moving"):
            paths[k] = os.path.join(tmp, f"{k}.nii.gz")
            sitk.WriteImage(sitk.Cast(case[k], sitk.sitkFloat32), paths[k])
        out = os.path.join(tmp, "u.npy")
        for n_threads in dict.fromkeys((threads, 1)):
            r = subprocess.run([sys.executable, __file__, "--elastix-worker", paths["fixed"], paths["moving"], out,
                                str(n_threads), "250" if quick else "1000"], capture_output=True, text=True)
            if r.returncode >= 0:
                break
            # killed by a signal (seen: a segmentation fault with 2 threads): once more on one thread
            print(f"  elastix crashed (signal {-r.returncode}) with {n_threads} threads; retrying on 1 thread",
                  flush=True)
        if r.returncode != 0:
            why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit code {r.returncode}"
            raise RuntimeError(f"elastix process failed: {why}")
        dt = json.loads(r.stdout.strip().splitlines()[-1])["time_s"]
        u = np.load(out)
    return u, dt


FIREANTS_SCRIPT = r"""
import json, sys, time
import numpy as np, torch, SimpleITK as sitk
from fireants.io.image import Image, BatchedImages
from fireants.registration.greedy import GreedyRegistration
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
fixed = BatchedImages([Image.load_file(a["fixed"], device="cpu")])
moving = BatchedImages([Image.load_file(a["moving"], device="cpu")])
t = time.perf_counter()
reg = GreedyRegistration(scales=[4, 2, 1], iterations=[200, 100, 50], fixed_images=fixed, moving_images=moving,
                         cc_kernel_size=5, deformation_type="compositive", smooth_grad_sigma=1,
                         smooth_warp_sigma=0.5, optimizer="Adam", optimizer_lr=0.5)
reg.optimize()
dt = time.perf_counter() - t
out = []
for c in a["coords"]:
    cm = BatchedImages([Image.load_file(c, device="cpu")])
    with torch.no_grad():
        w = reg.evaluate(fixed, cm)
    out.append(w[0, 0].cpu().numpy())
np.save(a["out"], np.stack(out, -1))
print(json.dumps({"time_s": dt}))
"""


def run_fireants(case, threads, python):
    coords, x = coordinate_images(case["fixed"])
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for k in ("fixed", "moving"):
            paths[k] = os.path.join(tmp, f"{k}.nii.gz")
            sitk.WriteImage(case[k], paths[k])
        cps = []
        for c, img in enumerate(coords):
            p = os.path.join(tmp, f"coord{c}.nii.gz")
            sitk.WriteImage(img, p)
            cps.append(p)
        out = os.path.join(tmp, "coords.npy")
        arg = json.dumps({"fixed": paths["fixed"], "moving": paths["moving"], "coords": cps, "out": out,
                          "threads": threads})
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH="")
        r = subprocess.run([str(python), "-c", FIREANTS_SCRIPT, arg], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
        dt = json.loads(r.stdout.strip().splitlines()[-1])["time_s"]
        y = np.load(out)
    return y.astype(np.float64) - x, dt


def peer_available(name, args):
    try:
        if name == "ants":
            import ants  # noqa: F401 - only whether it imports
        elif name == "elastix":
            import itk
            itk.elastix_registration_method  # noqa: B018 - only whether itk-elastix is there
        elif name == "fireants":
            py = Path(args.fireants_python)
            if not py.exists():
                return f"no interpreter at {py} (make the separate venv, see the docstring)"
            r = subprocess.run([str(py), "-c", "import fireants"], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=""))
            if r.returncode != 0:
                return "fireants does not import there: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    except (ImportError, AttributeError) as e:
        return f"not installed ({e})"
    return None


def run_method(name, case, args):
    if name == "ours":
        return run_ours(case, args.torch_threads)
    if name == "ants":
        return run_ants(case, args.threads)
    if name == "elastix":
        return run_elastix(case, args.threads, args.quick)
    return run_fireants(case, args.threads, args.fireants_python)


# --------------------------------------------------------------------------------------------- PET -> CT
def petct_case(args, seed=0):
    """The demo's PET -> CT registration: simulate + synthesize of the main job (cached), then its register.
    ``seed`` 0 is the demo's study; other seeds simulate other studies the same way (another lesion draw, axial
    window and bumps of the misalignment), to check that settings chosen on the demo's study carry over."""
    import torch

    from PETWorkbenchApp import pipeline
    from RegistrationModuleLib.petct import register_pet_to_ct
    torch.set_num_threads(args.torch_threads)
    root = CACHE / ("petct" if seed == 0 else f"petct_seed{seed}")
    st_spec = {"id": "demo", "anatomy": "sample"}
    pipeline.run_study(st_spec, root, steps=["simulate", "synthesize"], seed=seed, device="cpu")
    st = pipeline.Study(st_spec, root)
    ct = sitk.ReadImage(str(st.path("ct.nii.gz")))
    pet = sitk.ReadImage(str(st.path("synthesized.nii.gz")))
    u_true = sitk.GetArrayFromImage(sitk.ReadImage(str(st.path("true_field.nii.gz"))))
    body = body_mask(ct)
    t = time.perf_counter()
    res = register_pet_to_ct(ct, pet, body, device="cpu")
    dt = time.perf_counter() - t
    from RegistrationModuleLib.metrics import folding
    u = sitk.GetArrayFromImage(res.displacement)
    out = {"petct_err_before_mm": float(np.linalg.norm(u_true, axis=-1)[body].mean()),
           "petct_err_ours_mm": float(np.linalg.norm(u - u_true, axis=-1)[body].mean()),
           "petct_fold_ours": folding(res.displacement)["folding_pct"], "petct_time_s": dt}
    print(f"petct seed {seed}: " + " ".join(f"{k}={v:.4g}" for k, v in out.items()), flush=True)
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--elastix-worker":
        fixed, moving, out, threads, iterations = argv[1:6]
        return elastix_worker(fixed, moving, out, int(threads), int(iterations))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="elastix 250 iterations per level (< 15 min on 2 cores)")
    p.add_argument("--threads", type=int, default=2, help="threads of every method (ITK, ANTs, torch; default 2)")
    p.add_argument("--torch-threads", type=int, default=None, help="threads of ours (default: --threads)")
    p.add_argument("--cases", default="mni,ct,petct", help="comma-separated: mni, ct, petct, ct_noise, mni_noise")
    p.add_argument("--methods", default="ours,ants,elastix,fireants")
    p.add_argument("--petct-seeds", default="0", help="studies of the petct case (0 = the demo's, whose numbers "
                   "the last line reports; e.g. 0,1,2 to check the settings on studies they were not chosen on)")
    p.add_argument("--fireants-python", default=str(FIREANTS_PY))
    args = p.parse_args(argv)
    if args.torch_threads is None:
        args.torch_threads = args.threads
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    unknown = [c for c in args.cases.split(",") if c not in CASES and c != "petct"]
    if unknown:
        p.error(f"unknown case {unknown[0]!r}: choose from {', '.join(list(CASES) + ['petct'])}")
    methods = args.methods.split(",")
    for name in [m for m in methods if m in PEERS]:
        why = peer_available(name, args)
        if why:
            print(f"peer {name} skipped: {why}", flush=True)
            methods.remove(name)
    t_all = time.perf_counter()
    key = {}
    results = {}
    for cname in args.cases.split(","):
        if cname == "petct":
            seeds = [int(v) for v in args.petct_seeds.split(",")]
            runs = {sd: petct_case(args, sd) for sd in seeds}
            if 0 not in runs:
                print(f"petct: the last line reports seed {seeds[0]}, not the demo's study (seed 0)", flush=True)
            key.update(runs.get(0) or runs[seeds[0]])
            key["petct_fold_ours"] = max(r["petct_fold_ours"] for r in runs.values())
            if len(runs) > 1:
                ratio = [r["petct_err_ours_mm"] / r["petct_err_before_mm"] for r in runs.values()]
                print(f"petct over seeds {args.petct_seeds}: error/before " + " ".join(f"{v:.3f}" for v in ratio)
                      + f", mean error {np.mean([r['petct_err_ours_mm'] for r in runs.values()]):.3f} mm", flush=True)
            continue
        case = CASES[cname]()
        results[cname] = {}
        for m in methods:
            try:
                u, dt = run_method(m, case, args)
            except Exception as e:                           # a peer that fails is reported, not fatal
                if m == "ours":
                    raise
                print(f"{cname} {m}: failed ({type(e).__name__}: {e})", flush=True)
                continue
            r = score(case, u, dt)
            results[cname][m] = r
            print(f"{cname} {m}: " + " ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)
        peers = {m: r for m, r in results[cname].items() if m != "ours"}
        best = min(peers, key=lambda m: peers[m]["err_vox"]) if peers else None
        if best:
            print(f"{cname}: best peer {best}", flush=True)
        ours = results[cname].get("ours", {})
        key[f"{cname}_err_ours"] = ours.get("err_vox", math.nan)
        key[f"{cname}_time_ours_s"] = ours.get("time_s", math.nan)
        key[f"{cname}_err_best_peer"] = peers[best]["err_vox"] if best else math.nan
        key[f"{cname}_time_best_peer_s"] = peers[best]["time_s"] if best else math.nan
        key[f"{cname}_time_ants_s"] = peers.get("ants", {}).get("time_s", math.nan)
        key[f"{cname}_fold_ours"] = ours.get("fold_pct", math.nan)
    folds = [v for k, v in key.items() if k.endswith("_fold_ours")]
    key["fold_pct_ours"] = max(folds) if folds else math.nan
    print(f"total {time.perf_counter() - t_all:.0f} s", flush=True)
    keys = ["mni_err_ours", "mni_err_best_peer", "mni_time_ours_s", "mni_time_best_peer_s", "mni_time_ants_s",
            "ct_err_ours", "ct_err_best_peer", "ct_time_ours_s", "ct_time_best_peer_s", "fold_pct_ours",
            "petct_err_before_mm", "petct_err_ours_mm"]
    print(" ".join(f"{k}={key.get(k, math.nan):.4f}" for k in keys))


if __name__ == "__main__":
    main()
