"""PET intensity units: Bq/ml <-> SUV (body weight).

SUVbw = activity concentration [Bq/ml] / (injected dose [Bq] decayed to scan time / body weight [g]).
Models work in SUV; this module converts when the patient weight and injected dose are known, and refuses to guess
when they are not.
"""

from dataclasses import dataclass

from .errors import InputError
from .requests import option

KNOWN_UNITS = ("SUV", "BQML")


def normalise_units(units):
    u = (units or "").strip().upper().replace("/", "").replace(" ", "")
    if u in ("SUV", "SUVBW", "G/ML", "GML"):
        return "SUV"
    if u in ("BQML", "BQ/ML", "BQPERML"):
        return "BQML"
    raise InputError(f"Unknown PET units '{units}': expected SUV (g/ml) or Bq/ml")


def suv_factor(weight_kg, injected_dose_bq, decay_factor=1.0):
    """Multiply Bq/ml by this to get SUVbw."""
    if not weight_kg or weight_kg <= 0:
        raise InputError(f"Patient weight must be positive to compute SUV, got {weight_kg}")
    if not injected_dose_bq or injected_dose_bq <= 0:
        raise InputError(f"Injected dose must be positive to compute SUV, got {injected_dose_bq}")
    return (weight_kg * 1000.0) / (injected_dose_bq * decay_factor)


def to_suv(array, units, weight_kg=None, injected_dose_bq=None, decay_factor=1.0):
    """Array in ``units`` -> SUV (new array). Bq/ml needs weight and dose."""
    u = normalise_units(units)
    if u == "SUV":
        return array
    return array * suv_factor(weight_kg, injected_dose_bq, decay_factor)


def from_suv(array, units, weight_kg=None, injected_dose_bq=None, decay_factor=1.0):
    u = normalise_units(units)
    if u == "SUV":
        return array
    return array / suv_factor(weight_kg, injected_dose_bq, decay_factor)


def check_pet_range(array, units="SUV", name="The PET volume"):
    """Reject data that cannot be PET in these units: empty, NaN/Inf, no positive value, a CT in HU (values far
    below 0) or Bq/ml given as SUV (maximum above 1000). Returns (min, max)."""
    import numpy as np
    a = np.asarray(array)
    if a.size == 0:
        raise InputError(f"{name} is empty (no voxels)")
    finite = np.isfinite(a)
    if not finite.all():
        raise InputError(f"{name} contains {int(a.size - np.count_nonzero(finite))} NaN or infinite voxels")
    lo, hi = float(a.min()), float(a.max())
    if hi <= 0:
        raise InputError(f"{name} is empty: no positive values (all voxels <= 0)")
    if normalise_units(units) == "SUV":
        if lo < -50:
            raise InputError(f"{name}: minimum value {lo:.0f} is far below 0; this looks like a CT in HU, not PET "
                             "in SUV")
        if hi > 1000:
            raise InputError(f"{name}: maximum value {hi:.0f} is implausible for SUV; the volume is probably in "
                             "Bq/ml: convert it to SUV (needs patient weight and injected dose)")
    return lo, hi


SUV_UNIT_NAMES = ("suv", "suvbw", "g/ml", "suv (bw)")


def check_pet_image(image, name="The PET volume", units="SUV"):
    """The one PET validator of the engines: a 3-D scalar SimpleITK image in SUV (``units``), at least 2 voxels per
    axis, with the value checks of :func:`check_pet_range` (size bounds: the engines' ``voxel_limit`` when reading).
    Raises InputError naming ``name``; returns the image."""
    import SimpleITK as sitk
    if image is None:
        raise InputError("No PET volume given")
    if not isinstance(image, sitk.Image):
        raise InputError(f"{name} must be a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} must be a 3-D scalar volume (3D, one value per voxel); got a "
                         f"{image.GetDimension()}D image of size {image.GetSize()} with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    size = image.GetSize()
    if min(size) < 2:
        raise InputError(f"{name} is too small (size {size}); a 3D volume with at least 2 voxels per axis is needed")
    if units is None or str(units).strip().lower() not in SUV_UNIT_NAMES:
        raise InputError(f"{name} units are {units!r}; the model expects SUV (body weight). Convert Bq/ml to SUV "
                         "first (PETWorkbenchLib.units, needs patient weight and injected dose)")
    check_pet_range(sitk.GetArrayViewFromImage(image), "SUV", name)
    return image


@dataclass(kw_only=True)
class PETUnits:
    """The units fields of a request that takes PET (:mod:`PETWorkbenchLib.requests`): ``--units``,
    ``--weight-kg``, ``--injected-dose-mbq``, ``--decay-factor``."""

    units: str = option("SUV", help="units of the input PET: SUV (default) or Bq/ml (then give --weight-kg and "
                        "--injected-dose-mbq)")
    weight_kg: float = option(None, parse=float, help="patient weight (Bq/ml input)")
    injected_dose_mbq: float = option(None, parse=float, help="injected activity at scan time, MBq (Bq/ml input)")
    decay_factor: float = option(1.0, help="decay of the injected dose to scan time (Bq/ml input; default 1)")


def pet_in_suv(image, args, name):
    """(PET in SUV, factor SUV per input unit) from a command's image and its units (a :class:`PETUnits`
    request or namespace), checked by :func:`check_pet_image`."""
    factor = 1.0
    if normalise_units(args.units) == "BQML":
        dose = args.injected_dose_mbq * 1e6 if args.injected_dose_mbq else None
        factor = suv_factor(args.weight_kg, dose, args.decay_factor)
        image = to_suv(image, "BQML", args.weight_kg, dose, args.decay_factor)
    return check_pet_image(image, name), factor

