"""Every file PETWorkbench writes and every image it reads goes through here.

Writing (:func:`atomic_write` and the typed writers on top of it): the data go to a temporary file in the target's
folder, are flushed and fsynced, verified (re-read, or loaded back), and only then renamed over the target, after
which the folder is fsynced. A failed write (disk full, read-only folder, a writer that stops silently as
SimpleITK's NIfTI writer does) raises :class:`~PETWorkbenchLib.errors.ResourceError`, removes the temporary file and
leaves the previous file as it was. A target that is one of the inputs is refused, and an existing target is
replaced only with ``overwrite=True``.

Reading (:func:`read_image`): the header first, so that a volume too large for the engine is refused before its
voxels are allocated; then the voxel data are checked for truncation and header/data size mismatch (every format:
NIfTI is streamed through nibabel's opener, since ITK's NIfTI reader zero-fills missing data and turns NaN/Inf into
0; ITK raises for the others) and for NaN/Inf. Problems are reported in one line naming the file.

Geometry (:func:`match_grid`): images are compared in physical space (origin, spacing, direction); an image whose
voxels are those of the reference in another storage order (flipped or permuted axes) is resampled onto it exactly,
anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

from .errors import InputError, PETWorkbenchError, ResourceError, os_error_reason

_CHUNK = 1 << 24


class quiet_native_stderr:
    """Silence what ITK and the C libraries under it (NIfTI, MetaIO, NRRD) print on file descriptor 2 while a
    file is read or written: their failures come back as exceptions or are found by verification, and the user
    gets one line. What was printed is kept in ``.text`` (``--debug`` shows it)."""

    def __enter__(self):
        import SimpleITK as sitk
        self.text = ""
        self._warn = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            import sys
            sys.stderr.flush()
            self._saved = os.dup(2)
            self._tmp = tempfile.TemporaryFile()
            os.dup2(self._tmp.fileno(), 2)
        except (OSError, ValueError):
            self._saved = None
        return self

    def __exit__(self, *exc):
        import SimpleITK as sitk
        sitk.ProcessObject.SetGlobalWarningDisplay(self._warn)
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._tmp.seek(0)
            self.text = self._tmp.read().decode("utf-8", "replace")
            self._tmp.close()
            if self.text and os.environ.get("PETWORKBENCH_DEBUG") == "1":
                import sys
                sys.stderr.write(self.text)
        return False


# ------------------------------------------------------------------------------------------------------ writing
def full_suffix(path):
    """'.nii.gz' for 'x.nii.gz', '.png' for 'x.png' (what file writers choose their format by)."""
    name = Path(path).name.lower()
    for s in (".nii.gz", ".img.gz", ".tar.gz"):
        if name.endswith(s):
            return Path(path).name[-len(s):]
    return Path(path).suffix


def _same_file(a, b):
    try:
        if Path(a).exists() and Path(b).exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def check_output(path, inputs=(), overwrite=True, what="output"):
    """Refuse an output that is one of ``inputs``, or that exists when ``overwrite`` is False."""
    path = Path(path)
    for i in inputs or ():
        if i and _same_file(path, i):
            raise InputError(f"The {what} {path} is also an input; choose another output file (inputs are never "
                             "overwritten)")
    if path.is_dir():
        raise InputError(f"The {what} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise InputError(f"The {what} {path} exists; pass --overwrite to replace it, or choose another name")
    return path


def _fsync_dir(folder):
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask():
    """The process's file-creation mask (new files get 0o666 & ~mask, folders 0o777 & ~mask)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write, verify=None, *, inputs=(), overwrite=True, what="output"):
    """Write ``path`` through a temporary file in its folder: ``write(tmp_path)`` fills it, ``verify(tmp_path)``
    raises when it is wrong; then fsync and rename. Returns the final path. Raises ResourceError (disk, permission)
    or the writer's own PETWorkbenchError; the previous file is untouched and no temporary file is left."""
    path = Path(path)
    check_output(path, inputs, overwrite, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + full_suffix(path), dir=path.parent)
        os.close(fd)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~current_umask())
    except OSError as e:
        raise ResourceError(f"Cannot write {path}: {os_error_reason(e)}") from None
    tmp = Path(tmp)
    try:
        write(tmp)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise ResourceError(f"Cannot write {path}: nothing was written (is the disk full?)")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if verify is not None:
            try:
                verify(tmp)
            except PETWorkbenchError:
                raise ResourceError(f"Cannot write {path}: the file read back is incomplete or differs from what was "
                                    "written (is the disk full?); any previous file was left as it was") from None
        if path.exists() and not overwrite:  # appeared while writing
            raise InputError(f"The {what} {path} appeared while writing; it was left as it is")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise ResourceError(f"Cannot write {path}: {os_error_reason(e)}") from None
    except MemoryError:
        raise ResourceError(f"Cannot write {path}: out of memory") from None
    finally:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:
            pass
    return path


def write_bytes(data, path, **kw):
    data = bytes(data)

    def verify(t):
        if Path(t).read_bytes() != data:
            raise ResourceError("content differs")
    return atomic_write(path, lambda t: Path(t).write_bytes(data), verify, **kw)


def write_text(text, path, **kw):
    return write_bytes(str(text).encode("utf-8"), path, **kw)


def write_json(obj, path, indent=1, **kw):
    """JSON side file (serialised first, so an unserialisable value never touches the disk)."""
    return write_text(json.dumps(obj, indent=indent, default=_json_default) + "\n", path, **kw)


def _json_default(o):
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def write_csv(rows, path, fieldnames=None, **kw):
    import csv
    import io
    rows = list(rows)
    fieldnames = list(fieldnames or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return write_text(buf.getvalue(), path, **kw)


def _array_digest(image):
    import numpy as np
    import SimpleITK as sitk
    a = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
    return hashlib.sha256(a.view(np.uint8).reshape(-1)).hexdigest(), a.dtype


def write_image(image, path, compress=None, **kw):
    """Image file (format from the suffix; compressed when it ends in .gz or ``compress``), verified by reading it
    back: same size, geometry and voxel values."""
    import SimpleITK as sitk
    path = Path(path)
    compress = path.name.lower().endswith(".gz") if compress is None else bool(compress)
    digest = _array_digest(image)

    def write(t):
        w = sitk.ImageFileWriter()
        w.SetFileName(str(t))
        w.SetUseCompression(compress)
        try:
            with quiet_native_stderr():
                w.Execute(image)
        except RuntimeError as e:
            raise ResourceError(f"Cannot write {path}: {itk_message(e)} (is the disk full?); any previous file was "
                                "left as it was") from None

    def verify(t):
        back = read_image(t, "written image", dims=None, allow_nonfinite=True)
        if back.GetSize() != image.GetSize() or _array_digest(back) != digest:
            raise ResourceError("the voxel values read back differ")
        if not _geometry_close(back, image, rel=1e-5):
            raise ResourceError("the geometry read back differs")
    return atomic_write(path, write, verify, **kw)


def save_torch(obj, path, **kw):
    """A torch file (weights, checkpoints) of tensors and plain data, verified by loading it with
    ``weights_only=True``."""
    import torch

    def verify(t):
        try:
            torch.load(str(t), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to load back is a failed write
            raise ResourceError(f"cannot be loaded back ({type(e).__name__})") from None
    return atomic_write(path, lambda t: torch.save(obj, str(t)), verify, **kw)


def save_npz(path, compressed=True, **arrays):
    import numpy as np

    def write(t):
        with open(t, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)

    def verify(t):
        with np.load(str(t)) as z:
            if sorted(z.files) != sorted(arrays):
                raise ResourceError("arrays missing")
            for k in z.files:
                z[k]
    return atomic_write(path, write, verify)


def save_figure(fig, path, **kw):
    """A matplotlib figure, written through :func:`atomic_write` (verified: a non-empty PNG/PDF/SVG)."""
    fmt = full_suffix(path).lstrip(".") or "png"

    def verify(t):
        head = Path(t).read_bytes()[:8]
        if fmt == "png" and head != b"\x89PNG\r\n\x1a\n":
            raise ResourceError("not a PNG")
    return atomic_write(path, lambda t: fig.savefig(str(t), format=fmt, **kw), verify)


def memory_budget_bytes():
    """(Bytes an engine may use, where the figure comes from): ``PETWORKBENCH_MEMORY_GB`` when set, else 80 % of
    this machine's RAM."""
    env = os.environ.get("PETWORKBENCH_MEMORY_GB")
    if env:
        try:
            gb = float(env)
        except ValueError:
            raise InputError(f"PETWORKBENCH_MEMORY_GB must be a number of gigabytes, got {env!r}") from None
        if gb <= 0:
            raise InputError(f"PETWORKBENCH_MEMORY_GB must be positive, got {env!r}")
        return gb * 2**30, "budget (PETWORKBENCH_MEMORY_GB)"
    import psutil
    return 0.8 * psutil.virtual_memory().total, "memory budget (80 % of RAM; set PETWORKBENCH_MEMORY_GB)"


def voxel_budget(bytes_per_voxel):
    """(Voxels that fit the memory budget at ``bytes_per_voxel``, why): the one way engines state their bound."""
    budget, source = memory_budget_bytes()
    return int(budget / bytes_per_voxel), (f"about {bytes_per_voxel:.0f} bytes per voxel within the "
                                           f"{budget / 2**30:.3g} GB {source}")


# ------------------------------------------------------------------------------------------------------ reading
_SRC_PATH = re.compile(r"(?:[A-Za-z]:)?[^\s:]*[/\\][^\s:]*\.(?:cxx|hxx|txx|h|cpp):\d+:?\s*")


def itk_message(err):
    """The useful line of an ITK exception, without its source-file paths and 'sitk::ERROR:' prefixes."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    cleaned = []
    for ln in lines:
        ln = _SRC_PATH.sub("", ln)
        ln = re.sub(r"^(sitk::ERROR:|itk::ERROR:|ITK ERROR:|Description:|Reason:)\s*", "", ln).strip()
        ln = re.sub(r"^\w+\(0x[0-9a-f]+\):\s*", "", ln)
        if ln and not ln.startswith(("Location:", "File:", "Line:")):
            cleaned.append(ln)
    return (cleaned[-1] if cleaned else "unreadable")[:200]


def is_dicom_folder(p):
    """True when one of the first files of folder ``p`` is DICOM (a .dcm name or the DICM marker)."""
    p = Path(p)
    try:
        for i, f in enumerate(p.iterdir()):
            if i > 50:
                break
            if f.is_file():
                if f.suffix.lower() == ".dcm":
                    return True
                with open(f, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
    except OSError:
        pass
    return False


def _nifti_data_check(p, what):
    """Stream the NIfTI voxel block: byte count against the header, gzip integrity, NaN/Inf. Bounded memory."""
    import numpy as np
    try:
        import nibabel as nib
        from nibabel.openers import ImageOpener
    except ImportError:  # pragma: no cover - nibabel is a dependency
        return
    try:
        img = nib.load(str(p))
        hdr = img.header
        dtype = np.dtype(hdr.get_data_dtype())
        shape = hdr.get_data_shape()
        offset = int(img.dataobj.offset)          # the header's vox_offset field may be 0 for single files
    except Exception as e:  # noqa: BLE001 - any header failure: ITK reports the format problem
        raise InputError(f"{what} {p.name} cannot be read: damaged NIfTI header ({type(e).__name__})") from None
    need = int(math.prod(shape)) * dtype.itemsize
    floating = dtype.kind in "fc"
    got, bad, carry = 0, 0, b""
    try:
        with ImageOpener(str(p), "rb") as f:
            f.seek(offset)
            while got < need:
                chunk = f.read(min(_CHUNK, need - got))
                if not chunk:
                    break
                got += len(chunk)
                if floating:
                    buf = carry + chunk
                    n = len(buf) - len(buf) % dtype.itemsize
                    a = np.frombuffer(buf[:n], dtype=dtype)
                    bad += int(a.size - np.count_nonzero(np.isfinite(a)))
                    carry = buf[n:]
    except EOFError:
        raise InputError(f"{what} {p.name} is truncated: the compressed data end early (incomplete copy or "
                         "download?)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{what} {p.name} is damaged: {os_error_reason(e) if isinstance(e, OSError) else e}") \
            from None
    if got < need:
        raise InputError(f"{what} {p.name} is truncated: the header describes {need} bytes of voxel data, the "
                         f"file holds {got} (incomplete copy or download?)")
    if bad:
        raise InputError(f"{what} {p.name} contains {bad} NaN or infinite voxel values")


def _gzip_readable(p):
    import gzip
    import zlib
    try:
        with gzip.open(p, "rb") as f:
            f.read(1024)
        return True
    except (OSError, EOFError, zlib.error):
        return False


def _detached_data_check(p, what):
    """A MetaImage .mhd or NRRD .nhdr header whose separate voxel data file is missing."""
    key = {".mhd": "elementdatafile", ".nhdr": "data file"}.get(p.suffix.lower())
    if key is None:
        return
    try:
        lines = p.read_text(errors="replace").splitlines()[:200]
    except OSError:
        return
    for ln in lines:
        name, sep, value = ln.partition("=" if key == "elementdatafile" else ":")
        value = value.strip()
        if sep and name.strip().lower() in (key, "datafile") and value and value.upper() not in ("LOCAL", "LIST"):
            data = Path(value) if Path(value).is_absolute() else p.parent / value
            if "%" not in value and not data.exists():
                raise InputError(f"{what} {p.name} cannot be read: its voxel data file {data.name} is missing")
            return


def image_header(path, what="image"):
    """(SimpleITK reader with the header read, Path). Raises InputError naming the problem in one line."""
    import SimpleITK as sitk
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if p.is_dir():
        if is_dicom_folder(p):
            raise InputError(f"{what} {p} is a DICOM folder; only the PET input of synthesize, segment, pipeline "
                             "and batch reads a DICOM series: convert this one to NIfTI or NRRD (or load it in "
                             "Slicer's DICOM module)")
        raise InputError(f"{what} {p} is a folder, not an image file")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise InputError(f"{what} {p} cannot be read: {os_error_reason(e)}") from None
    if size == 0:
        raise InputError(f"{what} {p.name} is empty (0 bytes)")
    if not os.access(p, os.R_OK):
        raise InputError(f"{what} {p} cannot be read: permission denied")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with quiet_native_stderr():
            reader.ReadImageInformation()
    except RuntimeError as e:
        msg = itk_message(e)
        if "Unable to determine ImageIO" in str(e) or "Could not create IO object" in str(e):
            msg = "not an image format PETWorkbench reads (NIfTI, NRRD, MetaImage)"
            if p.name.lower().endswith(".gz") and not _gzip_readable(p):
                msg = "the compressed file is damaged or truncated"
        raise InputError(f"{what} {p.name} cannot be read: {msg}") from None
    return reader, p


def read_image(path, what="image", *, pixel_type=None, dims=(3,), voxel_limit=None, allow_nonfinite=False):
    """Read an image with every check described in the module docstring. ``voxel_limit(spacing) -> (max voxels,
    why)`` is the engine's memory bound (e.g. :func:`voxel_budget`), applied from the header before the voxels are
    read."""
    import numpy as np
    import SimpleITK as sitk
    reader, p = image_header(path, what)
    dim = reader.GetDimension()
    if dims and dim not in dims:
        raise InputError(f"{what} {p.name} is {dim}D (size {tuple(reader.GetSize())}); a "
                         f"{' or '.join(f'{d}D' for d in dims)} volume is needed")
    nvox = int(math.prod(reader.GetSize()))
    if nvox == 0:
        raise InputError(f"{what} {p.name} has no voxels (size {tuple(reader.GetSize())})")
    max_voxels, why = voxel_limit(reader.GetSpacing()) if voxel_limit else (None, "")
    if max_voxels is not None and nvox > max_voxels:
        raise InputError(f"{what} {p.name} is too large: {' x '.join(map(str, reader.GetSize()))} = {nvox:,} voxels, "
                         f"the limit is {int(max_voxels):,} ({why}); crop it or resample it to a coarser grid first")
    if p.name.lower().endswith((".nii", ".nii.gz")):
        _nifti_data_check(p, what)
    _detached_data_check(p, what)
    if pixel_type is not None:
        reader.SetOutputPixelType(pixel_type)
    try:
        with quiet_native_stderr():
            img = reader.Execute()
    except RuntimeError as e:
        msg = itk_message(e)
        if "No such file" in msg:      # MetaIO's words when the voxel data file is missing or ends early
            msg = "its voxel data file is missing or ends early"
        raise InputError(f"{what} {p.name} cannot be read (truncated or damaged?): {msg}") from None
    except MemoryError:
        raise ResourceError(f"Not enough memory to read {what} {p.name} ({nvox:,} voxels)") from None
    floats = (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)
    if not allow_nonfinite and img.GetPixelID() in floats:
        a = sitk.GetArrayViewFromImage(img)
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise InputError(f"{what} {p.name} contains {bad} NaN or infinite voxel values")
    return img


# ----------------------------------------------------------------------------------------------------- geometry
def _geometry_close(a, b, rel=1e-4):
    import numpy as np
    if a.GetSize() != b.GetSize():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    tol = rel * float(min(sa.min(), sb.min()))
    return (np.allclose(sa, sb, atol=tol, rtol=0) and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=max(tol, 1e-6),
                                                                  rtol=0)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=max(rel, 1e-6), rtol=0))


def describe_grid(img):
    r = lambda v: ", ".join(f"{x:.4g}" for x in v)
    return (f"size ({', '.join(map(str, img.GetSize()))}), spacing ({r(img.GetSpacing())}) mm, "
            f"origin ({r(img.GetOrigin())}) mm")


def same_voxels_reordered(img, ref, tol=1e-3):
    """True when ``img`` holds exactly the voxels of ``ref``'s grid, stored in another order (axes flipped or
    permuted): every voxel centre of ``ref`` is a voxel centre of ``img`` and the counts are equal."""
    import itertools

    import numpy as np
    if img.GetDimension() != ref.GetDimension() or math.prod(img.GetSize()) != math.prod(ref.GetSize()):
        return False
    n = ref.GetDimension()
    size = np.array(ref.GetSize())
    corners = [np.array(c) * (size - 1) for c in itertools.product((0, 1), repeat=n)]
    origin = np.array(img.TransformPhysicalPointToContinuousIndex(ref.TransformIndexToPhysicalPoint([0] * n)))
    steps = []
    for ax in range(n):
        idx = [0] * n
        idx[ax] = 1
        steps.append(np.array(img.TransformPhysicalPointToContinuousIndex(ref.TransformIndexToPhysicalPoint(idx)))
                     - origin)
    m = np.array(steps)                                       # rows: image-index step per reference axis
    if not np.allclose(np.abs(m), np.round(np.abs(m)), atol=tol) or not np.allclose(np.abs(np.round(m)).sum(1), 1):
        return False
    if sorted(np.argmax(np.abs(m), axis=1).tolist()) != list(range(n)):
        return False
    hi = np.array(img.GetSize()) - 1
    for c in corners:
        ci = origin + c @ m
        if np.any(np.abs(ci - np.round(ci)) > tol) or np.any(ci < -tol) or np.any(ci > hi + tol):
            return False
    return True


def match_grid(img, ref, what="image", ref_what="the reference"):
    """``img`` on ``ref``'s grid: itself when the grids agree in physical space, exactly resampled when it holds
    the same voxels in another storage order; otherwise InputError naming both grids."""
    import SimpleITK as sitk
    if _geometry_close(img, ref):
        return img
    if same_voxels_reordered(img, ref):
        return sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, img.GetPixelID())
    raise InputError(f"{what} does not lie on the grid of {ref_what}: {describe_grid(img)} against "
                     f"{describe_grid(ref)}; resample it onto {ref_what} first")


def resample_to_spacing(image, spacing, label=False, keep="center", default=0.0):
    """``image`` on a grid of ``spacing`` (x, y, z mm) covering the same physical extent, same direction; the one
    resampling function of the engines. Linear interpolation, nearest neighbour for a label map (``label``).

    ``keep`` says which point of the field of view stays where it was when the extent is not a whole number of new
    voxels: "center" (the middle of the field of view; DRMC, whose patches are symmetric) or "origin" (the first
    voxel; LDOS, whose label maps are compared voxel for voxel with the input's origin). An image already at
    ``spacing`` is returned as it is.
    """
    import numpy as np
    import SimpleITK as sitk
    if keep not in ("center", "origin"):
        raise ValueError(f"keep must be 'center' or 'origin', got {keep!r}")
    out_sp = np.array([float(s) for s in spacing])
    in_sp = np.array(image.GetSpacing(), float)
    if np.allclose(in_sp, out_sp, rtol=1e-4):
        return image
    in_sz = np.array(image.GetSize(), float)
    out_sz = [max(1, int(round(n))) for n in in_sz * in_sp / out_sp]
    origin = np.array(image.GetOrigin(), float)
    if keep == "center":
        d = np.array(image.GetDirection(), float).reshape(3, 3)
        origin = origin + d @ (((in_sz - 1) * in_sp - (np.array(out_sz) - 1) * out_sp) / 2.0)
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    return sitk.Resample(image, [int(s) for s in out_sz], sitk.Transform(), interp, origin.tolist(), out_sp.tolist(),
                         image.GetDirection(), default, image.GetPixelID())


def resample_like(image, reference, label=False, default=0.0):
    """``image`` resampled onto ``reference``'s grid (linear; nearest neighbour for a label map)."""
    import SimpleITK as sitk
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interp, default, image.GetPixelID())

