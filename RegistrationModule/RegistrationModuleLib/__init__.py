"""RegistrationModuleLib: deformable image registration engine of PETWorkbench (2D and 3D).

Engine API (no Slicer imports; images are SimpleITK, see docs/ARCHITECTURE.md)::

    from RegistrationModuleLib import register
    res = register(fixed, moving,
                   method="instance",          # "instance": weight-free multi-resolution instance optimisation of
                                               #   the field itself with implicit regularisation (the plain IO
                                               #   baseline of the NIO paper, not NIO: no network weights are
                                               #   optimised)
                                               # "dca": TM-DCA network prediction + optional refinement at full
                                               #        resolution (needs model=<model id | checkpoint path>)
                   similarity="lncc",          # "lncc" (same modality) | "mind" (multi-modal: CT/MR/PET)
                                               # | "mse" | "dice" (label-driven; needs the label maps)
                   smoothness=None,            # γ of the implicit regulariser, in (fixed voxel size)²
                   penalty=None,               # σ of the coupling (σ/2)‖(u − ū)/h‖²; None: the similarity's
                                               # default (lncc 1.5, others 1.0)
                   regularizer=None,           # "curvature" | "diffusion" | "elastic" (DCT/FFT implicit solve);
                                               # None: the similarity's default (curvature 64; mind: diffusion 1)
                   iterations=(100, 60, 25),   # Adam iterations per pyramid level, coarse -> fine (the NIO
                                               # paper's schedule with 25 instead of 30 at full resolution:
                                               # METHOD.md); the number of entries is the number of levels
                                               # (factor 2 each); with "dca" only the last entry is used (refinement
                                               # at full resolution; 0 = the network's field as predicted)
                   final_scale=1,              # 1: finest level at full resolution; 2 (or 4): stop the pyramid at
                                               # half (quarter) resolution and upsample the field (fast mode)
                   interpolation="corrected",  # how the similarity samples the moving image at full resolution:
                                               # "corrected" (linear without its sub-voxel-dependent blur),
                                               # "cubic" (B-spline, ~2x the time), "linear" (biased towards
                                               # whole-voxel shifts); coarser levels are linear (METHOD.md)
                   lncc_eps=None,              # lncc only: LNCC's stabiliser cov²/(var_f var_w + eps) on the
                                               # images scaled to 0..1; None: similarity.LNCC_EPS (1e-7; METHOD.md)
                   diffeomorphic=False,        # True: optimise a stationary velocity field, scaling and squaring
                                               # (with "dca": starting from the network's own velocity field)
                   prealign="affine",          # "affine" | "rigid" | "none" | "center" (MI, SimpleITK)
                   fixed_mask=None, moving_mask=None,          # restrict the similarity (images > 0)
                   fixed_labels=None, moving_labels=None,      # label maps: Dice term (weight label_weight)
                   device="auto",              # "auto" | "cpu" | "cuda[:N]" | "mps"
                   progress=None, cancel=None) # progress(fraction, message), cancel() -> bool
    res.displacement            # SimpleITK vector image (float64) on the fixed grid, LPS mm:
                                #   x_moving = x_fixed + u(x_fixed)  (ITK DisplacementFieldTransform convention)
                                #   it already contains the pre-alignment
    res.warp(moving_image, is_label=False)   # moving image (or label map, nearest) resampled onto the fixed grid
    res.jacobian_determinant()  # SimpleITK float32 image on the fixed grid
    res.transform()             # sitk.DisplacementFieldTransform
    res.transform_points(pts)   # fixed-space LPS points (N, d) -> moving space
    res.summary                 # dict: folding_pct, std_log_j, jacobian_min/max, timings {prealign_s,
                                #   network_s, deformable_s, total_s}, similarity per level, parameters

PET -> CT with the main job's settings (the CT mapped to the PET's intensities locally, then LNCC in its body):
``petct.register_pet_to_ct(ct, pet, body=None)`` (CLI ``--preset pet-ct``; METHOD.md §5).

Errors: :class:`PETWorkbenchLib.errors.InputError` for bad input (different dimensionality, empty mask,
non-overlapping images, colour images, unknown options...), ``ModelError`` for missing/corrupt TM-DCA weights,
``Cancelled`` when ``cancel()`` returns True.

Metrics (:mod:`RegistrationModuleLib.metrics`): ``dice``, ``hd95``, ``folding`` (% |J| <= 0, std(log J)), ``tre``.
Network (:mod:`RegistrationModuleLib.dca`): the TM-DCA model, its unsupervised training (NCC + diffusion) and
inference.  CLI: ``petworkbench register FIXED MOVING --output FIELD.nii.gz [--warped ...] [--jacobian ...]``.
Method notes and deviations from the papers: ``METHOD.md`` in this folder.
"""

__all__ = ["register", "RegistrationResult", "check_inputs", "prealign_transform"]


def __getattr__(name):
    """The API is imported on first use, so that torch-free parts (the similarity registry) load without torch."""
    if name in ("register", "check_inputs", "prealign_transform"):
        from . import infer
        return getattr(infer, name)
    if name == "RegistrationResult":
        from .result import RegistrationResult
        return RegistrationResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
