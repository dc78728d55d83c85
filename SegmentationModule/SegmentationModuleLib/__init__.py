"""SegmentationModuleLib: LDOS CT-free organ segmentation of (ultra-)low-dose PET (engine; no Slicer imports).

Method: Ye et al., "Self is the Best Learner: CT-free Ultra-Low-Dose PET Organ Segmentation via Collaborating
Denoising and Segmentation Learning" (LDOS, MICCAI 2025). See METHOD.md for details and deviations.

Engine API (images are SimpleITK images in SUV; label maps use the values of
``Resources/Terminology/PETWorkbenchOrgans.term.json``)::

    from SegmentationModuleLib import segment, organ_uptake, region_at_click, organ_specs, evaluate

    label, probs = segment(image, checkpoint, organs=None, device="auto", progress=None, cancel=None,
                           return_probabilities=False)
        # checkpoint: registry id ("segmentation-ldos-cpu"), a .pt path or a loaded checkpoint dict
        # organs: None (all 18) or names / label values; other organs are set to 0
        # label: uint8 SimpleITK image on the input grid; probs: None or a vector image (one component per class)
        # raises InputError (not a 3-D scalar SUV volume, Bq/ml or CT range, nothing found) or ModelError

    rows = organ_uptake(pet_image, label_image, specs)
        # [{"name", "value", "volume_ml", "suv_mean", "suv_max", "suv_peak" (PERCIST 1 cm^3 sphere, None < 1 ml)}]
        # the two images must share the grid (InputError otherwise)

    mask = region_at_click(label_array, organ_value_or_None, ijk)
        # label_array in numpy (k, j, i) order, ijk the clicked voxel in Slicer IJK order; boolean mask of the
        # connected component of the organ under the click (all False on background / another organ)

    specs = organ_specs(organs=None)          # segment specs: value, name, displayName, color, terminology
    result = evaluate(pred_label, ref_label, specs)   # Dice, IoU, HD95, ASD (mm) per organ + means
    fd = denoise(image, checkpoint)           # LDOS's denoising decoder output (full-dose estimate, SUV)
    label, _ = segment_fake_fdpet(image, denoiser, segmenter)   # the paper's Fake-FDPET baseline

Interactive lesion segmentation (PE-MED, MLMI 2023, and click-seeded thresholds; :mod:`.lesion`)::

    from SegmentationModuleLib.lesion import LesionSession, lesion_measures
    s = LesionSession(pet_image, method="pemed")      # or "suv2.5", "41pct", "50pct", "percist" (liver_mask=...)
    mask = s.add_click((i, j, k), positive=True)      # numpy bool (k, j, i); s.undo() goes back one click
    row = lesion_measures(suv_array, mask, spacing_zyx, liver_mask)   # SUVmax, SUVpeak, SUVmean, MTV, TLG

Training: :func:`SegmentationModuleLib.train.train` (configs in ``configs/``), CLI ``petworkbench segment``,
``petworkbench train segmentation``, ``petworkbench evaluate segmentation``, ``petworkbench lesion``,
``petworkbench train pemed`` (see ``cli.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .interactive import region_at_click
from .metrics import evaluate
from .organs import organ_specs, resolve_organs
from .uptake import organ_uptake

if TYPE_CHECKING:
    import SimpleITK as sitk


ORGAN_TASKS = ("ldos", "segonly")


def segments_organs(entry: Any) -> bool:
    """Whether a registered segmentation model (a ``PETWorkbenchLib.models.ModelEntry``) outputs organ label maps:
    the Fake-FDPET denoiser and the interactive PE-MED model do not."""
    return entry.config.get("task", "ldos") in ORGAN_TASKS


def segment(*args: Any, **kwargs: Any) -> tuple[sitk.Image, sitk.Image | None]:
    from .infer import segment as _segment
    return _segment(*args, **kwargs)


def denoise(*args: Any, **kwargs: Any) -> sitk.Image:
    from .infer import denoise as _denoise
    return _denoise(*args, **kwargs)


def segment_fake_fdpet(*args: Any, **kwargs: Any) -> tuple[sitk.Image, sitk.Image | None]:
    from .infer import segment_fake_fdpet as _f
    return _f(*args, **kwargs)


__all__ = ["segment", "denoise", "segment_fake_fdpet", "organ_uptake", "region_at_click", "organ_specs",
           "resolve_organs", "evaluate", "segments_organs", "ORGAN_TASKS"]
