"""PET DICOM series in (PETWorkbenchLib.dicom): SUVbw from the tags (decay per QIBA), geometry, one clear line per
unusable tag, and the commands reading a DICOM folder as their PET input."""

import datetime as dt
import math
import types

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_series import F18_HALF_LIFE, decay_seconds, expected_geometry, stored_volume, suv_factor, write_series
from PETWorkbenchLib.dicom import read_pet, read_pet_dicom, suv_factor_of_files, units_conflicts
from PETWorkbenchLib.errors import InputError


def _bqml():
    stored, slopes = stored_volume()
    return stored * slopes[:, None, None]


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_suv_geometry_and_slice_order(tmp_path):
    """Shuffled files under random names, a different RescaleSlope per slice, 60 min of F-18 decay."""
    write_series(tmp_path / "s")
    img, info = read_pet_dicom(tmp_path / "s")
    expected = _bqml() * suv_factor(decay_s=3600.0)
    a = sitk.GetArrayFromImage(img)
    assert img.GetPixelID() == sitk.sitkFloat32 and a.shape == expected.shape
    np.testing.assert_allclose(a, expected, rtol=1e-3)
    origin, spacing, direction = expected_geometry()
    assert np.allclose(img.GetOrigin(), origin) and np.allclose(img.GetSpacing(), spacing)
    assert np.allclose(img.GetDirection(), direction)
    assert info["suv_factor"] == pytest.approx(75.0 * 1000 / (370e6 * 2 ** (-3600 / F18_HALF_LIFE)), rel=1e-9)
    assert info["decay_factor"] == pytest.approx(2 ** (-3600 / F18_HALF_LIFE)) and info["decay_time_s"] == 3600
    assert (info["weight_kg"], info["injected_dose_bq"], info["half_life_s"]) == (75.0, 370e6, F18_HALF_LIFE)
    assert info["units"] == "BQML" and info["slices"] == 8 and info["series_uid"]
    assert info["reference_time_source"] == "SeriesTime" and info["injection_time"].endswith("10:00:00")


def test_oblique_orientation_and_physical_points(tmp_path):
    a = math.radians(30)
    orientation = (math.cos(a), math.sin(a), 0.0, 0.0, 0.0, -1.0)          # slice normal (-sin a, cos a, 0)
    write_series(tmp_path / "s", orientation=orientation, origin=(5.0, -7.0, 12.0))
    img, _ = read_pet_dicom(tmp_path / "s")
    r, c = np.array(orientation[:3]), np.array(orientation[3:])
    n = np.cross(r, c)
    for i, j, k in ((0, 0, 0), (15, 0, 0), (3, 11, 7), (0, 15, 4)):
        want = np.array([5.0, -7.0, 12.0]) + i * 2.0 * r + j * 2.5 * c + k * 3.0 * n
        assert np.allclose(img.TransformIndexToPhysicalPoint((i, j, k)), want, atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), _bqml() * suv_factor(), rtol=1e-3)


TAGS = {  # tag -> how write_series leaves it out
    "PatientWeight": {"drop": ("PatientWeight",)},
    "RadionuclideTotalDose": {"drop_item": ("RadionuclideTotalDose",)},
    "RadionuclideHalfLife": {"drop_item": ("RadionuclideHalfLife",)},
    "RadiopharmaceuticalStartTime": {"drop_item": ("RadiopharmaceuticalStartTime",)},
    "SeriesTime": {"drop": ("SeriesTime",)},
    "Units": {"drop": ("Units",)},
    "DecayCorrection": {"drop": ("DecayCorrection",)},
    "RadiopharmaceuticalInformationSequence": {"drop": ("RadiopharmaceuticalInformationSequence",)},
}


@pytest.mark.parametrize("tag", list(TAGS))
def test_each_missing_tag_is_named(tmp_path, tag):
    write_series(tmp_path / "s", **TAGS[tag])
    with pytest.raises(InputError) as err:
        read_pet_dicom(tmp_path / "s")
    line = _one_line(err)
    assert tag in line and "missing" in line and str(tmp_path / "s") in line
    assert "SUV cannot be computed" in line and "--units BQML" in line
    others = [t for t in TAGS if t != tag and t != "RadiopharmaceuticalInformationSequence"
              and not (tag == "RadiopharmaceuticalInformationSequence" and t.startswith("Radio"))]
    assert not any(f"{t} is missing" in line for t in others), line


@pytest.mark.parametrize("weight", ["0", ""])
def test_zero_or_empty_weight(tmp_path, weight):
    write_series(tmp_path / "s", weight=weight)
    with pytest.raises(InputError, match="PatientWeight is missing or 0"):
        read_pet_dicom(tmp_path / "s")


def test_decay_correction_none_is_refused(tmp_path):
    write_series(tmp_path / "s", decay="NONE")
    with pytest.raises(InputError) as err:
        read_pet_dicom(tmp_path / "s")
    line = _one_line(err)
    assert "DecayCorrection is NONE" in line and "each frame" in line


def test_decay_correction_admin_means_no_decay(tmp_path):
    write_series(tmp_path / "s", decay="ADMIN", series_time=None, drop_item=("RadionuclideHalfLife",))
    img, info = read_pet_dicom(tmp_path / "s")
    assert info["suv_factor"] == pytest.approx(75.0 * 1000 / 370e6) and info["decay_factor"] == 1.0
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), _bqml() * 75.0 * 1000 / 370e6, rtol=1e-3)


def test_units_gml_is_suv_already(tmp_path):
    write_series(tmp_path / "s", units="GML", weight=None, drop=("RadiopharmaceuticalInformationSequence",))
    img, info = read_pet_dicom(tmp_path / "s")
    assert info["suv_factor"] == 1.0 and info["units"] == "GML"
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), _bqml(), rtol=1e-6)
    write_series(tmp_path / "lbm", units="GML", extra={"SUVType": "LBM"})
    with pytest.raises(InputError, match="SUVType LBM"):
        read_pet_dicom(tmp_path / "lbm")


def test_images_not_decay_corrected_are_refused(tmp_path):
    write_series(tmp_path / "s", extra={"CorrectedImage": ["ATTN", "SCAT"]})
    with pytest.raises(InputError, match=r"CorrectedImage \(ATTN, SCAT\) lacks DECY"):
        read_pet_dicom(tmp_path / "s")


def test_other_units_refused(tmp_path):
    write_series(tmp_path / "s", units="CNTS")
    with pytest.raises(InputError, match="Units CNTS are not supported"):
        read_pet_dicom(tmp_path / "s")


@pytest.mark.parametrize("case", ["times only", "start date-time", "time-only start with dates"])
def test_injection_before_midnight(tmp_path, case):
    kw = {"times only": dict(start_time="233000", series_time="003000", acquisition_time="003000",
                             series_date=None, acquisition_date=None),
          "start date-time": dict(start_time=None, start_datetime="20240101233000", series_time="003000",
                                  acquisition_time="003000"),
          "time-only start with dates": dict(start_time="233000", series_time="003000",
                                             acquisition_time="003000")}[case]
    write_series(tmp_path / "s", **kw)
    _, info = read_pet_dicom(tmp_path / "s")
    assert info["decay_time_s"] == pytest.approx(3600.0) == decay_seconds("233000", "003000")
    assert info["suv_factor"] == pytest.approx(suv_factor(decay_s=3600.0), rel=1e-9)


def test_dates_are_used_when_present(tmp_path):
    """A start date-time a day before the series: 25 h of decay, not 1 h."""
    write_series(tmp_path / "s", start_time=None, start_datetime="20240101100000", series_time="110000")
    _, info = read_pet_dicom(tmp_path / "s")
    assert info["decay_time_s"] == pytest.approx(25 * 3600.0)
    write_series(tmp_path / "later", start_time=None, start_datetime="20240103100000")
    with pytest.raises(InputError, match="RadiopharmaceuticalStartDateTime .* is after the scan"):
        read_pet_dicom(tmp_path / "later")


def test_series_time_after_acquisition_uses_earliest_acquisition(tmp_path):
    """QIBA: a post-processed series' SeriesTime is when it was made; the earliest AcquisitionTime is the scan."""
    write_series(tmp_path / "s", series_time="143000", acquisition_time="110000")
    _, info = read_pet_dicom(tmp_path / "s")
    assert info["decay_time_s"] == pytest.approx(3600.0)
    assert info["reference_time_source"].startswith("earliest AcquisitionTime")


def test_several_series_are_refused_unless_one_is_chosen(tmp_path):
    d = tmp_path / "mixed"
    write_series(d, description="PET WB AC", series_uid="1.2.3.4.1")
    write_series(d, description="PET WB NAC", series_uid="1.2.3.4.2", seed=3)
    with pytest.raises(InputError) as err:
        read_pet_dicom(d)
    line = _one_line(err)
    assert "holds 2 series" in line and "PET WB AC" in line and "PET WB NAC" in line and "1.2.3.4.2" in line
    _, info = read_pet_dicom(d, series_uid="1.2.3.4.2")
    assert info["series_uid"] == "1.2.3.4.2" and info["slices"] == 8
    write_series(tmp_path / "petct", series_uid="1.2.3.4.5")
    write_series(tmp_path / "petct", modality="CT", description="CT AC", series_uid="1.2.3.4.6", seed=5)
    with pytest.raises(InputError, match="holds 2 series: .*CT 'CT AC'"):
        read_pet_dicom(tmp_path / "petct")


def test_non_pet_series_is_refused(tmp_path):
    write_series(tmp_path / "ct", modality="CT", description="Abdomen")
    with pytest.raises(InputError) as err:
        read_pet_dicom(tmp_path / "ct")
    assert "is not a PET series: Modality is CT" in _one_line(err)


def test_inconsistent_and_incomplete_series(tmp_path):
    paths = write_series(tmp_path / "w")
    ds = pydicom.dcmread(paths[3])
    ds.PatientWeight = "80"
    ds.save_as(paths[3])
    with pytest.raises(InputError, match=r"PatientWeight differs between the images of the series \(75, 80\)"):
        read_pet_dicom(tmp_path / "w")
    paths = write_series(tmp_path / "gap")
    paths[2].unlink()
    with pytest.raises(InputError, match="incomplete: NumberOfSlices says 8, the folder holds 7"):
        read_pet_dicom(tmp_path / "gap")
    paths = write_series(tmp_path / "gap2", drop=("NumberOfSlices",))
    order = sorted(paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    order[4].unlink()
    with pytest.raises(InputError, match="not evenly spaced"):
        read_pet_dicom(tmp_path / "gap2")
    paths = write_series(tmp_path / "tilt")
    ds = pydicom.dcmread(paths[0])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.98, 0.19899749]
    ds.save_as(paths[0])
    with pytest.raises(InputError, match="ImageOrientationPatient differs"):
        read_pet_dicom(tmp_path / "tilt")


def test_voxel_limit_applies_before_pixels_are_read(tmp_path, monkeypatch):
    import PETWorkbenchLib.dicom as dicom
    write_series(tmp_path / "s")
    monkeypatch.setattr(dicom, "_pixels", lambda *a: pytest.fail("pixel data read before the size check"))
    seen = []

    def limit(spacing):
        seen.append(tuple(spacing))
        return 1000, "a test bound"
    with pytest.raises(InputError, match=r"too large: 16 x 16 x 8 = 2,048 voxels, the limit is 1,000 \(a test bound"):
        read_pet_dicom(tmp_path / "s", voxel_limit=limit)
    assert seen == [(2.0, 2.5, 3.0)]


def test_suv_factor_of_files_matches_the_reader(tmp_path):
    paths = write_series(tmp_path / "s")
    info = suv_factor_of_files(paths)
    assert info["suv_factor"] == pytest.approx(read_pet_dicom(tmp_path / "s")[1]["suv_factor"], rel=1e-12)
    assert info["slices"] == 8
    with pytest.raises(InputError, match="is missing"):
        suv_factor_of_files(paths + [tmp_path / "s" / "gone.dcm"])


def _units(**kw):
    base = dict(units="SUV", weight_kg=None, injected_dose_mbq=None, decay_factor=1.0)
    return types.SimpleNamespace(**{**base, **kw})


def test_read_pet_units_options_agree_or_are_refused(tmp_path):
    write_series(tmp_path / "s")
    img, factor, units = read_pet(tmp_path / "s", "PET", _units())
    assert units == "BQML" and factor == pytest.approx(suv_factor())
    decayed = 370 * 2 ** (-3600 / F18_HALF_LIFE)
    read_pet(tmp_path / "s", "PET", _units(units="BQML", weight_kg=75.0, injected_dose_mbq=decayed))
    read_pet(tmp_path / "s", "PET", _units(units="BQML", weight_kg=75.0, injected_dose_mbq=370.0,
                                            decay_factor=2 ** (-3600 / F18_HALF_LIFE)))
    with pytest.raises(InputError) as err:
        read_pet(tmp_path / "s", "PET", _units(units="BQML", weight_kg=80.0, injected_dose_mbq=370.0))
    line = _one_line(err)
    assert "--weight-kg 80 (PatientWeight 75 kg)" in line and "--injected-dose-mbq 370" in line
    assert "Leave the units options out" in line
    write_series(tmp_path / "gml", units="GML")
    with pytest.raises(InputError, match=r"--units BQML \(the series is in SUV: Units GML\)"):
        read_pet(tmp_path / "gml", "PET", _units(units="BQML", weight_kg=75.0, injected_dose_mbq=370.0))
    info = read_pet_dicom(tmp_path / "s")[1]
    assert units_conflicts(info, decay_factor=0.5) == ["--decay-factor 0.5 (the tags give 0.6846)"]


def test_read_image_still_refuses_dicom_folders(tmp_path):
    from PETWorkbenchLib.imageio import read_image
    write_series(tmp_path / "s")
    with pytest.raises(InputError, match="is a DICOM folder; only the PET input"):
        read_image(tmp_path / "s", "CT")


# ------------------------------------------------------------------------------------------------ command line
def _cli(capfd, *argv):
    from PETWorkbenchApp.cli import main
    capfd.readouterr()
    code = main([str(a) for a in argv])
    return (code, *capfd.readouterr())


def test_segment_reads_a_dicom_folder(tmp_path, capfd, tiny_models):
    write_series(tmp_path / "pet")
    code, out, err = _cli(capfd, "--json", "segment", "--input", tmp_path / "pet", "--model",
                          tiny_models["segmentation"],
                          "--no-tta", "--output", tmp_path / "labels.nii.gz", "--uptake", tmp_path / "uptake.json")
    assert code == 0, err
    labels = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    origin, spacing, direction = expected_geometry()
    assert labels.GetSize() == (16, 16, 8) and np.allclose(labels.GetOrigin(), origin)
    assert np.allclose(labels.GetSpacing(), spacing)


def test_synthesize_reads_a_dicom_folder_and_writes_the_input_units(tmp_path, capfd, tiny_models):
    import json
    write_series(tmp_path / "pet")
    code, out, err = _cli(capfd, "--json", "synthesize", tmp_path / "pet", tmp_path / "full.nii.gz", "--model",
                          tiny_models["synthesis"], "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["units"] == "BQML"
    full = sitk.ReadImage(str(tmp_path / "full.nii.gz"))
    assert full.GetSize() == (16, 16, 8) and np.allclose(full.GetOrigin(), expected_geometry()[0])
    assert float(sitk.GetArrayViewFromImage(full).max()) > 1000          # Bq/ml, as the series


def test_batch_reads_dicom_study_folders_and_notices_changed_files(tmp_path, tiny_models):
    from PETWorkbenchApp.batch import load_studies, run_batch
    paths = write_series(tmp_path / "studies" / "s1" / "low_dose")
    studies = load_studies(tmp_path / "studies")
    assert studies == [{"id": "s1", "low_dose": str((tmp_path / "studies" / "s1" / "low_dose").resolve())}]
    steps = ["synthesize", "segment", "uptake"]
    first = run_batch(studies, tmp_path / "out", steps=steps, models=tiny_models)
    assert first["studies"][0]["status"] == "done", first
    syn = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "s1" / "synthesized.nii.gz")))
    assert float(syn.max()) < 1000                                        # the pipeline works in SUV
    assert run_batch(studies, tmp_path / "out", steps=steps, models=tiny_models)["studies"][0]["status"] == "skipped"
    for p in paths:                                                       # a corrected export: other weight
        ds = pydicom.dcmread(p)
        ds.PatientWeight = "90"
        ds.save_as(p)
    again = run_batch(studies, tmp_path / "out", steps=steps, models=tiny_models)
    assert again["studies"][0]["status"] == "done", again
    syn2 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "s1" / "synthesized.nii.gz")))
    assert not np.allclose(syn2, syn)
    assert len(list((tmp_path / "out" / "s1" / "superseded").rglob("synthesized.nii.gz"))) == 1


def test_commands_refuse_a_missing_tag_in_one_line(tmp_path, capfd):
    write_series(tmp_path / "pet", drop=("PatientWeight",))
    for argv in (("segment", "--input", tmp_path / "pet", "--output", tmp_path / "l.nii.gz"),
                 ("synthesize", tmp_path / "pet", tmp_path / "o.nii.gz")):
        code, _, err = _cli(capfd, *argv)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1, err
        assert "PatientWeight is missing or 0" in lines[0] and str(tmp_path / "pet") in lines[0]
    write_series(tmp_path / "ok")
    code, _, err = _cli(capfd, "segment", "--input", tmp_path / "ok", "--output", tmp_path / "l.nii.gz",
                        "--weight-kg", "60")
    assert code == 2 and "--weight-kg 60 (PatientWeight 75 kg)" in err


# ------------------------------------------------------------------------------------------------ real data
def test_real_nema_series_without_suv_tags(shared_data, capfd, tmp_path):
    folder = shared_data / "nema_iq_pet_dicom" / "pet_recon_1"
    if not folder.is_dir():
        pytest.skip("NEMA PET DICOM series not present in the shared data")
    with pytest.raises(InputError) as err:
        read_pet_dicom(folder)
    line = _one_line(err)
    for tag in ("Units", "PatientWeight", "SeriesTime", "RadiopharmaceuticalInformationSequence"):
        assert f"{tag} " in line
    code, _, err = _cli(capfd, "segment", "--input", folder, "--output", tmp_path / "l.nii.gz")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Units is missing" in err


def test_real_monochrome1_series_is_not_inverted(shared_data, monkeypatch):
    """The NEMA series is MONOCHROME1 (GDCM inverts it on read): voxels and geometry as its pydicom conversion."""
    import PETWorkbenchLib.dicom as dicom
    folder = shared_data / "nema_iq_pet_dicom" / "pet_recon_1"
    ref_path = shared_data / "nema_iq_pet_dicom" / "pet_recon_1.nii.gz"
    if not (folder.is_dir() and ref_path.is_file()):
        pytest.skip("NEMA PET DICOM series not present in the shared data")
    monkeypatch.setattr(dicom, "suv_from_headers", lambda items, where: {"suv_factor": 1.0, "units": "BQML"})
    img, info = read_pet_dicom(folder)
    ref = sitk.ReadImage(str(ref_path))
    assert img.GetSize() == ref.GetSize() == (192, 192, 89) and info["slices"] == 89
    assert np.allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    assert np.allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    assert np.allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)
    a, b = sitk.GetArrayViewFromImage(img), sitk.GetArrayViewFromImage(ref)
    assert float(a.mean()) == pytest.approx(423.0, rel=1e-2)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)


def test_time_parsing_edge_cases():
    from PETWorkbenchLib.dicom import _parse_datetime, _parse_time
    assert _parse_time("10:30:15.5") == pytest.approx(10 * 3600 + 30 * 60 + 15.5)
    assert _parse_time("1030") == 10 * 3600 + 30 * 60 and _parse_time("") is None and _parse_time("25") is None
    assert _parse_datetime("20240101233000.000000+0100") == (dt.date(2024, 1, 1), 23 * 3600 + 30 * 60)
