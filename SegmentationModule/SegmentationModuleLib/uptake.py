"""Organ uptake statistics: volume (ml), SUVmean, SUVmax and SUVpeak per organ.

SUVpeak follows PERCIST 1.0 (Wahl et al. 2009): the highest mean SUV in a 1 cm^3 sphere (radius 6.2 mm); here
the sphere centre may be any voxel of the organ and the sphere mean uses every image voxel whose centre lies
inside the sphere. It is None when the organ is smaller than the sphere (volume < 1 ml).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.metrics import PEAK_VOLUME_ML, sphere_mean

if TYPE_CHECKING:
    from collections.abc import Iterable

    import SimpleITK as sitk

def _check_same_grid(a, b):
    if a.GetSize() != b.GetSize():
        raise InputError(f"PET and label map differ in size: {a.GetSize()} vs {b.GetSize()}")
    for what, x, y in (("spacing", a.GetSpacing(), b.GetSpacing()), ("origin", a.GetOrigin(), b.GetOrigin()),
                       ("direction", a.GetDirection(), b.GetDirection())):
        if not np.allclose(x, y, atol=1e-3):
            raise InputError(f"PET and label map differ in {what}: {tuple(round(v, 4) for v in x)} vs "
                             f"{tuple(round(v, 4) for v in y)}; resample the labels onto the PET grid")


def organ_uptake(pet_image: sitk.Image, label_image: sitk.Image, specs: Iterable[dict]) -> list[dict]:
    """Uptake table rows for every spec in ``specs`` (value, name) present in ``label_image``.

    Returns a list of dicts ``name, value, volume_ml, suv_mean, suv_max, suv_peak`` (``suv_peak`` None when the
    organ is smaller than 1 ml). Organs absent from the label map are left out.
    """
    import SimpleITK as sitk
    if pet_image is None:
        raise InputError("No PET image given")
    if pet_image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("The PET image must be a scalar volume")
    _check_same_grid(pet_image, label_image)
    pet = sitk.GetArrayFromImage(pet_image).astype(np.float64)
    lab = sitk.GetArrayFromImage(label_image)
    sp = tuple(reversed(pet_image.GetSpacing()))
    voxel_ml = float(np.prod(sp)) / 1000.0
    peak_map = None
    rows = []
    for s in specs:
        v = int(s["value"])
        m = lab == v
        n = int(m.sum())
        if n == 0:
            continue
        vals = pet[m]
        vol = n * voxel_ml
        peak = None
        if vol >= PEAK_VOLUME_ML - 1e-9:
            if peak_map is None:
                peak_map = sphere_mean(pet, sp)
            peak = float(peak_map[m].max())
        rows.append(dict(name=s["name"], value=v, volume_ml=float(vol), suv_mean=float(vals.mean()),
                         suv_max=float(vals.max()), suv_peak=peak))
    return rows
