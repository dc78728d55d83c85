"""PET -> CT deformable registration with the settings of the main job (``--preset pet-ct``).

The CT is Gaussian-smoothed to a PET's resolution (``CT_SIGMA_MM``; about 4.7 mm FWHM), mapped to the PET's
intensities by their local conditional mean (:func:`.intensity.local_intensity_map`, ``CT_MAPPING``), and the PET is
registered to it with LNCC inside the CT's body mask (``SETTINGS``; no pre-alignment: PET/CT scanners acquire
both in one frame of reference, and what is left is breathing and patient motion).  How each setting was chosen
and what it bought: ``METHOD.md`` §5.  The displacement is on the CT's grid (smoothing and mapping keep the
geometry).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import SimpleITK as sitk

    from .result import RegistrationResult

# lncc_eps: the engine's earlier LNCC stabiliser; the default's lower floor (similarity.LNCC_EPS) lets the PET's
# noise count as structure (demo study 2.18 -> 2.24 mm, seeds 3 / 4: 2.54 / 2.29 -> 2.63 / 2.38 mm)
SETTINGS = {"similarity": "lncc", "regularizer": "diffusion", "smoothness": 8.0, "penalty": 3.0,
            "iterations": (200, 100, 50), "learning_rate": 2.0, "prealign": "none", "lncc_eps": 1e-5}
CT_SIGMA_MM = 2.0
CT_MAPPING = {"bins": 16, "sigma_mm": 20.0}


def fingerprint() -> str:
    """'pet-ct@<16 hex digits>' of the settings above, so that results made with other settings can be told apart."""
    settings = dict(SETTINGS, ct_sigma_mm=CT_SIGMA_MM, ct_mapping=CT_MAPPING)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()
    return f"pet-ct@{digest[:16]}"


def register_pet_to_ct(ct: sitk.Image, pet: sitk.Image, body: np.ndarray | sitk.Image | None = None,
                       device: str = "cpu", progress: Callable[[float, str], None] | None = None,
                       cancel: Callable[[], bool] | None = None) -> RegistrationResult:
    """Register ``pet`` (moving) to ``ct`` (fixed, HU).  ``body``: the region of the CT the similarity is measured
    in, a numpy array on the CT grid or a label map on it (default: the body, the largest component above
    -500 HU with holes filled)."""
    import numpy as np
    import SimpleITK as sitk

    from PETWorkbenchLib.errors import InputError
    from PETWorkbenchLib.progress import Reporter
    from .infer import check_inputs, register
    from .intensity import local_intensity_map
    from .synthetic import body_mask

    rep = Reporter(progress, cancel)
    check_inputs(ct, pet)                                # clear messages before the smoothing touches the CT
    if body is None:
        if float(np.min(sitk.GetArrayViewFromImage(ct))) > -500.0:
            raise InputError("the fixed image does not look like a CT in HU (no air below -500 HU, so no body "
                             "outline); the pet-ct preset needs fixed = CT, moving = PET, or a body mask")
        body = body_mask(ct)
    elif isinstance(body, sitk.Image):                   # a label map, on the CT's grid or not
        body = sitk.GetArrayFromImage(sitk.Resample(body, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    body = np.asarray(body) > 0
    if body.shape != sitk.GetArrayViewFromImage(ct).shape:
        raise InputError(f"the body mask has shape {body.shape}, the CT {sitk.GetArrayViewFromImage(ct).shape}")
    if not body.any():
        raise InputError("the CT's body mask is empty (no voxel above -500 HU, or an empty mask was given)")
    mask = sitk.GetImageFromArray(body.astype("uint8"))
    mask.CopyInformation(ct)
    rep(0.0, "mapping the CT to the PET's intensities")
    fixed = sitk.SmoothingRecursiveGaussian(sitk.Cast(ct, sitk.sitkFloat32), CT_SIGMA_MM)
    fixed = local_intensity_map(fixed, pet, body, **CT_MAPPING)
    rep.check()
    res = register(fixed, pet, method="instance", fixed_mask=mask, device=device, progress=progress,
                   cancel=cancel, **SETTINGS)
    res.summary["preset"] = "pet-ct"
    res.summary["preset_settings"] = fingerprint()
    return res
