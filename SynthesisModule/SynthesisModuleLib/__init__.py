"""SynthesisModuleLib: DRMC multi-centre low-dose PET synthesis engine (Yang et al., MICCAI 2023).

Importing this package is cheap (no torch); the functions below import their sub-modules on first use.

Engine API
----------
``synthesize(image, model, device="auto", patch=None, overlap=DEFAULT_OVERLAP (0.3), sw_batch_size=2,
units="SUV", progress=None, cancel=None, skip_air=True, precision=DEFAULT_PRECISION ("float32"),
blend_sigma=BLEND_SIGMA (0.25))
-> (SimpleITK.Image, dict)``
    ``image``: low-dose PET, 3D ``SimpleITK.Image`` in SUV (body weight). Bq/ml must be converted first
    (``PETWorkbenchLib.units``); ``units`` other than SUV raise ``InputError``, as do 2D, empty, NaN/inf images and
    implausible SUV maxima (> 1e4, i.e. probably Bq/ml).
    ``model``: registry id (e.g. ``"synthesis-drmc-cpu"``), weights file (``{config, state_dict}``), checkpoint dict
    or a ``Generator``. ``patch``: sliding-window size in voxels at 2 mm (default: the model's training patch);
    ``overlap`` in [0, 1) and ``blend_sigma`` (Gaussian blending weight's sigma / patch size);
    ``sw_batch_size`` bounds memory (only that many patches on the device at a time).
    ``precision``: the network's arithmetic, "float32" (default) or "bfloat16" (autocast on CPU or CUDA; the input,
    the blending and the predicted change added to the input stay float32; METHOD.md: no consistent gain on a
    2-core CPU with native bfloat16, whole-body PSNR within 0.002 dB).
    Pipeline: float32 -> resample to 2 mm isotropic (linear) -> clip negatives, / ``suv_scale`` -> sliding window
    over the body's bounding box with Gaussian blending (PETWorkbenchLib.inference; air outside the box and patches
    of air inside it returned as they are) -> x ``suv_scale`` -> the predicted change (output - input on the 2 mm
    grid) back to the input grid (linear) and added to the native input, so the round trip costs the input none of
    its detail -> negatives clipped. Returns the full-dose estimate in SUV on the input grid (metadata copied) and
    a routing summary: ``{"routed", "n_patches", "banks": ["block1.attention", "block1.ffn", ...],
    "mean_weight" (banks x M), "top1_fraction" (banks x M), "active_fraction", "all_zero_fraction", "model",
    "device", "patch", "overlap", "grid_2mm", "precision", "blend_sigma"}`` (``routed`` False for the baseline).
    Raises ``InputError`` (bad input), ``ModelError`` (weights), ``Cancelled``.

``load_model(model, device) -> (Generator, config)``; ``build_model(config)``; ``train(config, manifest, out_dir,
...)`` (DDP under torchrun); ``evaluate(models, manifest, out_dir, ...)`` (per-centre tables, routing PNG);
``interference(model, sampler, ...)`` (I_ij, supplement eq. 4-5).

Configs: ``configs/*.json`` (``{"name", "model": {...}, "train": {...}}``): ``drmc_paper`` (C=64, M=3, N=5, 64^3),
``baseline_paper`` (15 base blocks), ablations ``drmc_paper_noH`` / ``_softmax`` / ``_top2``, and the CPU demo
``drmc_cpu`` / ``baseline_cpu``.

Manifest (training / evaluation): ``manifest.csv`` with columns case_id, patient_id, center, known, tracer, drf,
split, full_dose, low_dose, low_dose_drf20, ct, labels, lesions, spacing_mm, units; paths relative to the manifest.
"""

DEFAULT_OVERLAP = 0.3  # sliding-window overlap of synthesize(), the CLI and the module (synthesis_speed.py)
BLEND_SIGMA = 0.25    # Gaussian blending width / patch size of synthesize() (METHOD.md, Inference)
DEFAULT_PRECISION = "float32"  # the network's arithmetic in synthesize() (bfloat16: an option; METHOD.md)

__all__ = ["DEFAULT_OVERLAP", "BLEND_SIGMA", "DEFAULT_PRECISION", "synthesize", "load_model", "build_model",
           "train", "evaluate", "interference", "load_config"]

_WHERE = {"synthesize": "infer", "load_model": "infer", "build_model": "model", "train": "train",
          "load_config": "train", "evaluate": "evaluate", "interference": "metrics"}


def __getattr__(name):
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(name)
