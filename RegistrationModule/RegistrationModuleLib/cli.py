"""``petworkbench register``: deformable registration from the command line (and the Slicer worker)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PETWorkbenchLib.requests import option

from .similarities import INTERPOLATIONS, describe, similarity_names

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable


def _levels(text):
    return tuple(int(v) for v in str(text).replace(" ", "").split(",") if v != "")


def _levels_text(levels):
    return ",".join(str(int(v)) for v in levels)


@dataclass
class RegisterRequest:
    """``petworkbench register``: what the command line and the Registration module's logic both build."""

    fixed: str = option(positional=True, help="fixed image (NIfTI/NRRD)")
    moving: str = option(positional=True, help="moving image")
    output: str = option(required=True, short="-o", help="displacement field to write (.nii.gz / .nrrd / .mha)")
    warped: str = option(None, help="write the moving image resampled onto the fixed grid")
    jacobian: str = option(None, help="write the Jacobian determinant image")
    moving_labels_out: str = option(None, help="write the warped moving label map (needs --moving-labels)")
    method: str = option("instance", choices=("instance", "dca"),
                         help="instance: weight-free instance optimisation of the field with implicit "
                              "regularisation (no network); dca: TM-DCA network (needs --model) refined at full "
                              "resolution")
    model: str = option(None, help="TM-DCA model id or checkpoint (method dca)")
    similarity: str = option("lncc", choices=similarity_names, help=describe())
    regularizer: str = option(None, choices=("diffusion", "elastic", "curvature"),
                              help="implicitly solved regulariser (default: curvature; diffusion with mind)")
    smoothness: float = option(None, parse=float,
                               help="regularisation weight γ, in (fixed voxel size)² (default: 64; 1 with mind)")
    penalty: float = option(None, parse=float,
                            help="weight σ of the coupling between the field and its regularised version (default: "
                                 "1.5 with lncc, 1.0 otherwise)")
    iterations: tuple = option((100, 60, 25), parse=_levels, format=_levels_text,
                               help="Adam iterations per pyramid level, coarse to fine (default 100,60,25); with "
                              "--method dca only the last number is used: refinement iterations at full "
                              "resolution, 0 = none")
    interpolation: str = option("corrected", choices=INTERPOLATIONS,
                                help="how the similarity samples the moving image at full resolution: corrected "
                                     "(default: linear without its sub-voxel-dependent blur), cubic (B-spline, "
                                     "slower) or linear (biased towards whole-voxel shifts)")
    lncc_eps: float = option(None, parse=float,
                             help="lncc only: LNCC's stabiliser on the images scaled to 0..1 (default 1e-7); a "
                                  "larger value, e.g. 1e-5, makes flat, noisy regions count less (METHOD.md)")
    diffeomorphic: bool = option(flag=True, help="integrate the field as a stationary velocity")
    prealign: str = option("affine", choices=("affine", "rigid", "none", "center"), help="pre-alignment")
    fixed_mask: str = option(None, help="fixed mask (label map)")
    moving_mask: str = option(None, help="moving mask (label map)")
    fixed_labels: str = option(None, help="fixed label map (label-driven terms, Dice)")
    moving_labels: str = option(None, help="moving label map")
    device: str = option("auto", help="auto, cpu, cuda[:N] or mps")
    preset: str = option(None, choices=("pet-ct",),
                         help="pet-ct: FIXED is a CT, MOVING a PET of the same PET/CT study; the main job's "
                              "settings (the CT smoothed and mapped to the PET's intensities locally, LNCC in the "
                              "CT's body or --fixed-mask, no pre-alignment); the method, similarity, "
                              "optimisation, label and moving-mask options must stay at their defaults")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from PETWorkbenchLib.requests import add_arguments
    p = subparsers.add_parser("register", help="deformable registration of MOVING onto FIXED",
                              description="Register MOVING to FIXED; writes the displacement field (fixed grid, "
                                          "LPS mm, x_moving = x_fixed + u(x_fixed)).")
    add_arguments(p, RegisterRequest)
    p.set_defaults(func=run_register)

    try:
        from PETWorkbenchLib.commands import group
    except ImportError:          # older foundation without command groups
        return
    t = group(subparsers, "train").add_parser(
        "registration", help="train TM-DCA (unsupervised: NCC + diffusion) on a GPU",
        description="Unsupervised TM-DCA training on random pairs of the given images (resampled to --img-size, "
                    "intensities scaled to 0..1 by percentiles). Resumable checkpoint.")
    t.add_argument("images", nargs="+", help="3D images (NIfTI/NRRD), or one folder of them")
    t.add_argument("--out", required=True, help="checkpoint file (.pt)")
    t.add_argument("--steps", type=int, default=100000)
    t.add_argument("--img-size", type=_levels, default=(160, 192, 224), help="z,y,x (multiple of 32*window)")
    t.add_argument("--window", type=_levels, default=None, help="attention window z,y,x (default img_size//32)")
    t.add_argument("--embed-dim", type=int, default=96)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--reg-weight", type=float, default=1.0)
    t.add_argument("--device", default="cuda")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=run_train)
    e = group(subparsers, "evaluate").add_parser(
        "registration", help="Dice/HD95 of warped labels, folding and std(log J) of a field, landmark TRE")
    e.add_argument("field", help="displacement field written by `register`")
    e.add_argument("--fixed-labels")
    e.add_argument("--warped-labels", help="moving label map already warped onto the fixed grid")
    e.add_argument("--moving-labels", help="moving label map (warped here with the field)")
    e.add_argument("--fixed-points", help="CSV x,y,z (LPS mm) landmarks in the fixed image")
    e.add_argument("--moving-points", help="CSV x,y,z (LPS mm) corresponding landmarks in the moving image")
    e.set_defaults(func=run_evaluate)


# Peak memory of register() per voxel of the fixed grid (field, Adam moments, pyramids, similarity features), per
# interpolation of the full-resolution level, with a margin over the peak RSS measured by benchmarks/memory.py
# (LNCC, 192 x 192 x 160: linear 285, corrected 421-483 in two runs, cubic 571 bytes).
BYTES_PER_FIXED_VOXEL = {"corrected": 600, "cubic": 800, "linear": 400}


def _read(path, what, pixel_type=None, voxel_limit=None):
    """A 2D or 3D image of the command, or None when the option was not given."""
    from PETWorkbenchLib.imageio import read_image
    if path is None:
        return None
    return read_image(path, what, pixel_type=pixel_type, dims=(2, 3), voxel_limit=voxel_limit)


def run_register(args: argparse.Namespace, reporter: Callable[[float, str], None] | None = None) -> dict:
    from PETWorkbenchLib.errors import InputError
    from PETWorkbenchLib.imageio import check_output, voxel_budget, write_image
    from PETWorkbenchLib.requests import from_args
    from .infer import register

    overwrite = getattr(args, "overwrite", False)
    args = from_args(RegisterRequest, args)
    inputs = [p for p in (args.fixed, args.moving, args.fixed_mask, args.moving_mask, args.fixed_labels,
                          args.moving_labels) if p]
    outputs = [(args.output, "displacement field"), (args.warped, "warped image"), (args.jacobian, "Jacobian image"),
               (args.moving_labels_out, "warped label map")]
    for path, what in outputs:
        if path:
            check_output(path, inputs, overwrite, what)
    named = [str(Path(p).resolve()) for p, _ in outputs if p]
    if len(set(named)) != len(named):
        raise InputError("the output files must all be different")
    if args.moving_labels_out and not args.moving_labels:
        raise InputError("--moving-labels-out needs --moving-labels")
    budget = voxel_budget(BYTES_PER_FIXED_VOXEL[args.interpolation])
    fixed = _read(args.fixed, "fixed image", voxel_limit=lambda spacing: budget)
    moving = _read(args.moving, "moving image")
    moving_labels = _read(args.moving_labels, "moving label map")
    if args.preset == "pet-ct":
        res = _register_preset(args, fixed, moving, reporter)
    else:
        res = register(fixed, moving, method=args.method, model=args.model, similarity=args.similarity,
                       regularizer=args.regularizer, smoothness=args.smoothness, penalty=args.penalty,
                       iterations=args.iterations,
                       diffeomorphic=args.diffeomorphic, prealign=args.prealign, interpolation=args.interpolation,
                       lncc_eps=args.lncc_eps,
                       fixed_mask=_read(args.fixed_mask, "fixed mask"),
                       moving_mask=_read(args.moving_mask, "moving mask"),
                       fixed_labels=_read(args.fixed_labels, "fixed label map"), moving_labels=moving_labels,
                       device=args.device, progress=reporter)
    write = {"inputs": inputs, "overwrite": overwrite}
    res.save(args.output, **write)
    out = {"displacement": str(args.output)}
    if args.warped:
        write_image(res.warp(moving), args.warped, **write)
        out["warped"] = str(args.warped)
    if args.jacobian:
        write_image(res.jacobian_determinant(), args.jacobian, **write)
        out["jacobian"] = str(args.jacobian)
    if args.moving_labels_out:
        write_image(res.warp(moving_labels, is_label=True), args.moving_labels_out, **write)
        out["moving_labels_out"] = str(args.moving_labels_out)
    summary = dict(res.summary)
    summary["outputs"] = out
    return summary


def _register_preset(args, fixed, moving, reporter):
    """``--preset pet-ct``: RegistrationModuleLib.petct; options that the preset sets itself must not be given."""
    from PETWorkbenchLib.errors import InputError
    from .petct import register_pet_to_ct
    defaults = RegisterRequest(fixed="", moving="", output="")
    changed = [name for name in ("method", "model", "similarity", "regularizer", "smoothness", "penalty",
                                 "iterations", "interpolation", "lncc_eps", "diffeomorphic", "prealign",
                                 "moving_mask",
                                 "fixed_labels", "moving_labels")
               if getattr(args, name) != getattr(defaults, name)]
    if changed:
        raise InputError("--preset pet-ct sets the registration itself; leave out "
                         + ", ".join("--" + n.replace("_", "-") for n in changed))
    body = _read(args.fixed_mask, "fixed mask")
    return register_pet_to_ct(fixed, moving, body, device=args.device, progress=reporter)


def _read_points(path):
    import numpy as np
    from PETWorkbenchLib.errors import InputError
    if not Path(path).is_file():
        raise InputError(f"landmark file not found: {path}")
    try:
        pts = np.loadtxt(path, delimiter=",", ndmin=2)
    except ValueError as e:
        raise InputError(f"landmark file {Path(path).name} is not a CSV of x,y,z rows: {e}") from None
    if pts.shape[1] != 3 or not np.isfinite(pts).all():
        raise InputError(f"landmark file {Path(path).name} must hold finite x,y,z rows (got shape {pts.shape})")
    return pts


def run_evaluate(args: argparse.Namespace, reporter: Callable[[float, str], None] | None = None) -> dict:
    import SimpleITK as sitk

    from PETWorkbenchLib.errors import InputError
    from . import metrics
    from .result import RegistrationResult

    from PETWorkbenchLib.imageio import match_grid
    field = _read(args.field, "displacement field", sitk.sitkVectorFloat64)
    res = RegistrationResult(field)
    out = {"folding": metrics.folding(res.displacement)}
    if args.fixed_labels:
        fixed_labels = match_grid(_read(args.fixed_labels, "fixed label map"), res.displacement,
                                  "the fixed label map", "the displacement field")
        if args.warped_labels:
            warped = match_grid(_read(args.warped_labels, "warped label map"), fixed_labels,
                                "the warped label map", "the fixed label map")
        elif args.moving_labels:
            warped = res.warp(_read(args.moving_labels, "moving label map"), is_label=True)
        else:
            raise InputError("--fixed-labels needs --warped-labels or --moving-labels")
        per, mean = metrics.dice(fixed_labels, warped)
        hper, hmean = metrics.hd95(fixed_labels, warped)
        out.update({"dice_mean": mean, "dice": per, "hd95_mean_mm": hmean, "hd95_mm": hper})
    if args.fixed_points or args.moving_points:
        if not (args.fixed_points and args.moving_points):
            raise InputError("landmark TRE needs both --fixed-points and --moving-points")
        errs, mean = metrics.tre(res.displacement, _read_points(args.fixed_points), _read_points(args.moving_points))
        out.update({"tre_mean_mm": mean, "tre_mm": errs.tolist()})
    return out


def run_train(args: argparse.Namespace, reporter: Callable[[float, str], None] | None = None) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F

    from PETWorkbenchLib.errors import InputError
    from . import dca

    paths = []
    for p in args.images:
        p = Path(p)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.name.endswith((".nii", ".nii.gz", ".nrrd", ".mha")))
        else:
            paths.append(p)
    if len(paths) < 2:
        raise InputError(f"training needs at least 2 images, got {len(paths)}")
    size = tuple(args.img_size)
    vols = []
    for p in paths:
        a = sitk.GetArrayFromImage(_read(p, "training image", sitk.sitkFloat32))
        lo, hi = np.percentile(a, [0.5, 99.5])
        a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
        t = torch.from_numpy(a)[None, None]
        vols.append(F.interpolate(t, size=size, mode="trilinear", align_corners=True))
    rng = np.random.default_rng(args.seed)

    def sampler():
        i, j = rng.choice(len(vols), 2, replace=False)
        m, f = vols[i], vols[j]
        if rng.random() < 0.5:                       # random flip (the paper's IXI augmentation)
            ax = int(rng.integers(2, 5))
            m, f = m.flip(ax), f.flip(ax)
        return m, f

    window = tuple(args.window) if args.window else tuple(max(1, s // 32) for s in size)
    config = {"img_size": list(size), "window_size": list(window), "embed_dim": args.embed_dim}
    torch.manual_seed(args.seed)
    log = []

    def logger(msg):
        log.append(msg)
        if reporter is not None:
            step = int(msg.split()[1].split("/")[0])
            reporter(step / args.steps, msg)

    dca.train(sampler, config, steps=args.steps, lr=args.lr, reg_weight=args.reg_weight, device=args.device,
              checkpoint=args.out, log=logger)
    return {"checkpoint": str(args.out), "images": len(paths), "steps": args.steps, "last": log[-1] if log else ""}
