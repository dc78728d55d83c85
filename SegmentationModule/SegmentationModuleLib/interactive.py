"""Click-to-mask logic of the "PET organs" Segment Editor effect (engine side, no Slicer needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from PETWorkbenchLib.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Sequence


def region_at_click(label_image_array: np.ndarray, organ_value_or_None: int | None, ijk: Sequence[float],
                    connectivity: int = 1) -> np.ndarray:
    """Boolean mask of the connected component of the predicted organ under a click.

    ``label_image_array``: integer prediction in SimpleITK/numpy order (k, j, i) = (z, y, x).
    ``organ_value_or_None``: restrict to this organ; None takes the organ under the click.
    ``ijk``: the clicked voxel in Slicer/ITK index order (i, j, k) = (x, y, z) (it is rounded).
    ``connectivity``: 1 = faces (6-neighbourhood), 2 = +edges (18), 3 = +corners (26).

    Returns an all-False mask when the click is on background or on another organ than the requested one.
    """
    arr = np.asarray(label_image_array)
    if arr.ndim != 3:
        raise InputError(f"The label map must be 3-D, got an array with shape {arr.shape}")
    try:
        i, j, k = (int(round(float(c))) for c in ijk)
    except (TypeError, ValueError):
        raise InputError(f"The click position must be three voxel indices (i, j, k), got {ijk!r}") from None
    nk, nj, ni = arr.shape
    if not (0 <= i < ni and 0 <= j < nj and 0 <= k < nk):
        raise InputError(f"The click (i, j, k) = ({i}, {j}, {k}) is outside the volume of size "
                         f"(i, j, k) = ({ni}, {nj}, {nk})")
    if connectivity not in (1, 2, 3):
        raise InputError(f"connectivity must be 1, 2 or 3, got {connectivity}")
    value = arr[k, j, i]
    target = value if organ_value_or_None is None else int(organ_value_or_None)
    if value == 0 or value != target:
        return np.zeros(arr.shape, bool)
    # label only the bounding box of this organ for speed
    organ = arr == target
    lab, _ = ndimage.label(organ, structure=ndimage.generate_binary_structure(3, connectivity))
    return lab == lab[k, j, i]
