"""Unusable input images are refused with exit code 2 and one line naming the file, never read silently wrong:
truncated NIfTI (ITK's reader zero-fills what is missing), NaN/Inf voxels (ITK's NIfTI reader turns them into 0),
a CT in HU given as PET, a volume too large for the memory budget (refused from the header, before reading), DICOM
folders, empty files, damaged NRRD/MetaImage files (no ITK source paths, no extra lines from ITK)."""

import gzip
import time

import numpy as np
import pytest
import SimpleITK as sitk

from reliability_tools import assert_one_error_line, cli, error_lines, pet_image, write_pet

ITK_NOISE = (".cxx", ".hxx", "itk::", "sitk::", "ITK ERROR", "Traceback")


def _nifti_bytes(tmp_path, img=None):
    p = tmp_path / "whole.nii"
    sitk.WriteImage(img or pet_image(), str(p))
    data = p.read_bytes()
    p.unlink()
    return data


TRUNCATIONS = {
    "nii-half": (".nii", lambda d: d[: len(d) // 2]),
    "nii-last-100-bytes": (".nii", lambda d: d[:-100]),
    "nii.gz-stream-cut": (".nii.gz", lambda d: gzip.compress(d)[: len(gzip.compress(d)) // 2]),
    "nii.gz-last-100-bytes": (".nii.gz", lambda d: gzip.compress(d[:-100])),
    "nii.gz-last-voxel-missing": (".nii.gz", lambda d: gzip.compress(d[:-4])),
}


@pytest.mark.parametrize("case", list(TRUNCATIONS))
def test_truncated_nifti_is_refused(tmp_path, capfd, case):
    suffix, cut = TRUNCATIONS[case]
    bad = tmp_path / f"low{suffix}"
    bad.write_bytes(cut(_nifti_bytes(tmp_path)))
    code, _, err = cli(capfd, "synthesize", bad, tmp_path / "out.nii.gz")
    assert code == 2, (code, err)
    line = assert_one_error_line(err, bad.name)
    assert "truncated" in line or "damaged" in line
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("where,value", [("first", np.nan), ("middle", np.nan), ("last", np.nan), ("last", np.inf)])
def test_nonfinite_voxels_in_nifti_are_refused(tmp_path, capfd, suffix, where, value):
    img = pet_image()
    a = sitk.GetArrayFromImage(img)
    idx = {"first": (0, 0, 0), "middle": (8, 8, 8), "last": (-1, -1, -1)}[where]
    a[idx] = value
    bad = sitk.GetImageFromArray(a)
    bad.CopyInformation(img)
    path = tmp_path / f"low{suffix}"
    sitk.WriteImage(bad, str(path))
    code, _, err = cli(capfd, "synthesize", path, tmp_path / "out.nii.gz")
    assert code == 2, (code, err)
    assert "NaN or infinite" in assert_one_error_line(err, path.name)


def _command(command, image, out, models):
    if command == "synthesize":
        return ["synthesize", image, out, "--model", models["synthesis"]]
    return ["segment", "--input", image, "--output", out, "--model", models["segmentation"]]


def _ct(path):
    ct = np.full((16, 16, 16), -1000, np.int16)
    ct[3:13, 3:13, 3:13] = 40
    ct[7:9, 7:9, 7:9] = 1200
    img = sitk.GetImageFromArray(ct)
    img.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(img, str(path))
    return path


def test_ct_in_hu_given_to_synthesize_is_refused(tmp_path, capfd, tiny_models):
    ct = _ct(tmp_path / "ct.nii.gz")
    code, _, err = cli(capfd, "synthesize", ct, tmp_path / "out.nii.gz", "--model", tiny_models["synthesis"])
    assert code == 2, (code, err)
    assert "CT" in assert_one_error_line(err)
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("command", ["synthesize", "segment"])
def test_ct_refusal_names_the_file(tmp_path, capfd, tiny_models, command):
    ct = _ct(tmp_path / "ct.nii.gz")
    argv = _command(command, ct, tmp_path / "out.nii.gz", tiny_models)
    code, _, err = cli(capfd, *argv)
    assert code == 2
    assert_one_error_line(err, ct.name)


def _header_only_nifti(path, shape=(512, 512, 400)):
    """A NIfTI header describing a ~400 MB float volume, with no voxel data at all."""
    import nibabel as nib
    h = nib.Nifti1Header()
    h.set_data_shape(shape)
    h.set_data_dtype(np.float32)
    h.set_zooms((2.0, 2.0, 2.0))
    h["vox_offset"] = 352
    data = h.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("command", ["synthesize", "segment"])
def test_volume_over_the_memory_budget_is_refused_from_the_header(tmp_path, capfd, monkeypatch, tiny_models,
                                                                  command):
    import importlib
    for engine in ("SegmentationModuleLib.infer", "SynthesisModuleLib.infer"):
        importlib.import_module(engine)                      # imports out of the timing
    big = _header_only_nifti(tmp_path / "big.nii.gz")
    monkeypatch.setenv("PETWORKBENCH_MEMORY_GB", "0.001")
    argv = _command(command, big, tmp_path / "out.nii.gz", tiny_models)
    t0 = time.perf_counter()
    code, _, err = cli(capfd, *argv)
    seconds = time.perf_counter() - t0
    assert code == 2, (code, err)
    line = assert_one_error_line(err, big.name, "PETWORKBENCH_MEMORY_GB")
    assert "too large" in line and "512 x 512 x 400" in line     # from the header: the file holds no voxels
    assert seconds < 3.0, seconds


def test_dicom_folder_is_named_as_a_dicom_folder(tmp_path, capfd):
    d = tmp_path / "series"
    d.mkdir()
    for i in range(3):
        (d / f"IM{i:04d}").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    code, _, err = cli(capfd, "synthesize", d, tmp_path / "out.nii.gz")
    assert code == 2
    assert "DICOM folder" in assert_one_error_line(err, d.name)


def test_empty_image_file_says_empty(tmp_path, capfd):
    p = tmp_path / "low.nii.gz"
    p.write_bytes(b"")
    code, _, err = cli(capfd, "synthesize", p, tmp_path / "out.nii.gz")
    assert code == 2
    assert "empty" in assert_one_error_line(err, p.name)


def _damaged(tmp_path, kind):
    img = pet_image()
    if kind in ("nrrd-truncated", "mha-truncated"):
        ext = kind.split("-")[0]
        good = tmp_path / f"good.{ext}"
        sitk.WriteImage(img, str(good))
        data = good.read_bytes()
        p = tmp_path / f"low.{ext}"
        p.write_bytes(data[: len(data) - 3000])
    elif kind == "nrrd-bad-header":
        p = tmp_path / "low.nrrd"
        p.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4\nencoding: raw\n\n")
    elif kind == "mhd-missing-raw":
        p = tmp_path / "low.mhd"
        p.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_FLOAT\n"
                     "ElementDataFile = low.raw\n")
    elif kind == "text-as-nii.gz":
        p = tmp_path / "low.nii.gz"
        p.write_text("patient notes, not an image\n")
    elif kind == "random-bytes-nii":
        p = tmp_path / "low.nii"
        p.write_bytes(np.random.default_rng(0).bytes(2000))
    elif kind == "nii-bad-magic":
        p = tmp_path / "low.nii"
        sitk.WriteImage(img, str(p))
        data = bytearray(p.read_bytes())
        data[344:348] = b"xxxx"
        p.write_bytes(bytes(data))
    return p


DAMAGED = ["nrrd-truncated", "mha-truncated", "nrrd-bad-header", "mhd-missing-raw", "text-as-nii.gz",
           "random-bytes-nii", "nii-bad-magic"]


@pytest.mark.parametrize("kind", DAMAGED)
def test_damaged_file_error_names_the_file_without_itk_source_paths(tmp_path, capfd, kind):
    p = _damaged(tmp_path, kind)
    code, _, err = cli(capfd, "synthesize", p, tmp_path / "out.nii.gz")
    assert code == 2, (code, err)
    last = error_lines(err)[-1]
    assert last.startswith("petworkbench: error: ") and p.name in last, err
    assert not any(s in last for s in ITK_NOISE), last


@pytest.mark.parametrize("kind", DAMAGED)
def test_damaged_file_error_is_one_line(tmp_path, capfd, kind):
    p = _damaged(tmp_path, kind)
    code, _, err = cli(capfd, "synthesize", p, tmp_path / "out.nii.gz")
    assert code == 2
    assert len(error_lines(err)) == 1, f"stderr is not one line: {err!r}"


def test_missing_voxel_file_is_not_called_truncated(tmp_path, capfd):
    p = _damaged(tmp_path, "mhd-missing-raw")
    code, _, err = cli(capfd, "synthesize", p, tmp_path / "out.nii.gz")
    assert code == 2
    assert "end early" not in err and "truncated" not in err, err


def test_successful_write_prints_no_itk_warnings(tmp_path, capfd, tiny_models):
    low = write_pet(tmp_path / "low.nii.gz")
    code, _, err = cli(capfd, "synthesize", low, tmp_path / "out.mha", "--model", tiny_models["synthesis"],
                       "--device", "cpu")
    assert code == 0, err
    assert not any(s in err for s in ITK_NOISE), err
