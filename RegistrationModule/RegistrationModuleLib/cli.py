"""``petworkbench register``: deformable registration from the command line (and the Slicer worker)."""

from pathlib import Path


def _levels(text):
    return tuple(int(v) for v in str(text).replace(" ", "").split(",") if v != "")


def add_commands(subparsers):
    p = subparsers.add_parser("register", help="deformable registration of MOVING onto FIXED",
                              description="Register MOVING to FIXED; writes the displacement field (fixed grid, "
                                          "LPS mm, x_moving = x_fixed + u(x_fixed)).")
    p.add_argument("fixed", help="fixed image (NIfTI/NRRD)")
    p.add_argument("moving", help="moving image")
    p.add_argument("--output", "-o", required=True, help="displacement field to write (.nii.gz / .nrrd / .mha)")
    p.add_argument("--warped", help="write the moving image resampled onto the fixed grid")
    p.add_argument("--jacobian", help="write the Jacobian determinant image")
    p.add_argument("--moving-labels-out", help="write the warped moving label map (needs --moving-labels)")
    p.add_argument("--method", default="instance", choices=["instance", "dca"])
    p.add_argument("--model", help="TM-DCA model id or checkpoint (method dca)")
    p.add_argument("--similarity", default="lncc", choices=["lncc", "mind", "mse", "dice"])
    p.add_argument("--regularizer", default="diffusion", choices=["diffusion", "elastic", "curvature"])
    p.add_argument("--smoothness", type=float, default=1.0)
    p.add_argument("--iterations", type=_levels, default=(100, 60, 30),
                   help="Adam iterations per pyramid level, coarse to fine (default 100,60,30)")
    p.add_argument("--diffeomorphic", action="store_true")
    p.add_argument("--prealign", default="affine", choices=["affine", "rigid", "none", "center"])
    p.add_argument("--fixed-mask")
    p.add_argument("--moving-mask")
    p.add_argument("--fixed-labels")
    p.add_argument("--moving-labels")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_register)


def run_register(args, reporter=None):
    import SimpleITK as sitk

    from PETWorkbenchLib.errors import InputError
    from .engine import register

    def read(path, what):
        if path is None:
            return None
        if not Path(path).exists():
            raise InputError(f"{what} file not found: {path}")
        try:
            return sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise InputError(f"cannot read {what} '{path}': {exc}") from None

    fixed = read(args.fixed, "fixed image")
    moving = read(args.moving, "moving image")
    moving_labels = read(args.moving_labels, "moving label map")
    res = register(fixed, moving, method=args.method, model=args.model, similarity=args.similarity,
                   regularizer=args.regularizer, smoothness=args.smoothness, iterations=args.iterations,
                   diffeomorphic=args.diffeomorphic, prealign=args.prealign,
                   fixed_mask=read(args.fixed_mask, "fixed mask"), moving_mask=read(args.moving_mask, "moving mask"),
                   fixed_labels=read(args.fixed_labels, "fixed label map"), moving_labels=moving_labels,
                   device=args.device, progress=reporter)
    res.save(args.output)
    out = {"displacement": str(args.output)}
    if args.warped:
        sitk.WriteImage(res.warp(moving), str(args.warped))
        out["warped"] = str(args.warped)
    if args.jacobian:
        sitk.WriteImage(res.jacobian_determinant(), str(args.jacobian))
        out["jacobian"] = str(args.jacobian)
    if args.moving_labels_out:
        if moving_labels is None:
            raise InputError("--moving-labels-out needs --moving-labels")
        sitk.WriteImage(res.warp(moving_labels, is_label=True), str(args.moving_labels_out))
        out["moving_labels_out"] = str(args.moving_labels_out)
    summary = dict(res.summary)
    summary["outputs"] = out
    return summary
