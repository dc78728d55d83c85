"""One definition of each thing: the unified functions give the numbers the copies they replace gave.

The reference implementations below are the previous per-engine copies, kept here only as the yardstick."""

import numpy as np
import pytest
import SimpleITK as sitk

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.imageio import resample_like, resample_to_spacing
from PETWorkbenchLib.units import check_pet_image


def _old_synthesis_resample(image, spacing=(2.0, 2.0, 2.0), interpolator=sitk.sitkLinear, default=0.0):
    in_sp, in_sz, out_sp = np.array(image.GetSpacing(), float), np.array(image.GetSize(), float), np.array(spacing)
    out_sz = [max(1, int(round(n))) for n in in_sz * in_sp / out_sp]
    d = np.array(image.GetDirection(), float).reshape(3, 3)
    origin = np.array(image.GetOrigin(), float) + d @ (((in_sz - 1) * in_sp - (np.array(out_sz) - 1) * out_sp) / 2)
    return sitk.Resample(image, [int(s) for s in out_sz], sitk.Transform(), interpolator, origin.tolist(),
                         out_sp.tolist(), image.GetDirection(), default, image.GetPixelID())


def _old_segmentation_resample(image, spacing, is_label=False):
    spacing = [float(s) for s in spacing]
    if np.allclose(image.GetSpacing(), spacing, rtol=1e-4):
        return image
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, size, sitk.Transform(), interp, image.GetOrigin(), spacing, image.GetDirection(),
                         0, image.GetPixelID())


def _image(label=False):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (23, 31, 37)).astype(np.uint8) if label else rng.random((23, 31, 37)).astype(np.float32)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((1.3, 1.7, 2.9))
    img.SetOrigin((-12.0, 4.5, 30.0))
    img.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    return img


def _same(a, b):
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetSpacing(), b.GetSpacing())
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


@pytest.mark.parametrize("label", [False, True])
def test_resampling_gives_what_both_engine_copies_gave(label):
    img = _image(label)
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    _same(resample_to_spacing(img, (2.0, 2.0, 2.0), label=label), _old_synthesis_resample(img, interpolator=interp))
    _same(resample_to_spacing(img, (4.0, 4.0, 4.0), label=label, keep="origin"),
          _old_segmentation_resample(img, (4.0, 4.0, 4.0), label))
    assert resample_to_spacing(img, img.GetSpacing()) is img
    centred = resample_to_spacing(img, (2.0, 2.0, 2.0), label=label)
    kept = resample_to_spacing(img, (2.0, 2.0, 2.0), label=label, keep="origin")
    assert not np.allclose(centred.GetOrigin(), kept.GetOrigin())     # the two conventions are really different
    back = resample_like(centred, img, label=label)
    assert back.GetSize() == img.GetSize() and back.GetOrigin() == img.GetOrigin()


def test_engines_use_the_one_resampling_and_validator():
    from SegmentationModuleLib import data as seg_data
    from SegmentationModuleLib import infer as seg_infer
    from SynthesisModuleLib import data as syn_data
    from SynthesisModuleLib import infer as syn_infer
    img = _image()
    _same(seg_data.resample_to_spacing(img, (4.0, 4.0, 4.0)), _old_segmentation_resample(img, (4.0, 4.0, 4.0)))
    assert syn_data.resample_to_spacing is resample_to_spacing and syn_infer.resample_like is resample_like
    assert syn_infer.check_pet_image is check_pet_image and seg_infer.check_pet_image is check_pet_image


@pytest.mark.parametrize("values,problem", [
    (lambda a: a * 2000.0 - 1000.0, "CT in HU"), (lambda a: a * 5000.0, "Bq/ml"), (lambda a: a * 0.0, "empty"),
    (lambda a: np.where(a > 0.5, np.nan, a), "NaN")])
def test_one_pet_validator_one_suv_ceiling(values, problem):
    a = np.random.default_rng(1).random((8, 9, 10)).astype(np.float32)
    good = sitk.GetImageFromArray(a)
    assert check_pet_image(good) is good
    with pytest.raises(InputError, match=problem):
        check_pet_image(sitk.GetImageFromArray(values(a).astype(np.float32)), "PET x.nii.gz")
    with pytest.raises(InputError, match="x.nii.gz"):
        check_pet_image(sitk.GetImageFromArray(values(a).astype(np.float32)), "PET x.nii.gz")


def test_one_device_resolver():
    import torch

    from PETWorkbenchLib.device import choose_device, torch_device
    assert torch_device("cpu") == torch.device("cpu") and torch_device(None) == choose_device("auto").torch()
    assert torch_device(torch.device("cpu")) == torch.device("cpu")
    assert torch_device(choose_device("cpu")) == torch.device("cpu")
    with pytest.raises(InputError):
        torch_device("tpu")


def test_default_models_are_set_in_models_json_only(tmp_path):
    import json

    from PETWorkbenchLib.errors import ModelError
    from PETWorkbenchLib.models import default_model
    from PETWorkbenchLib.paths import resources_dir
    assert default_model("synthesis") == "synthesis-drmc-cpu"
    assert default_model("segmentation") == "segmentation-ldos-cpu"
    data = json.loads((resources_dir() / "Models.json").read_text())
    for m in data["models"]:
        m["default"] = m["family"] == "segmentation"          # every segmentation model marked: ambiguous
    reg = tmp_path / "Models.json"
    reg.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="exactly one default segmentation model"):
        default_model("segmentation", reg)
    with pytest.raises(ModelError, match="marks none"):
        default_model("synthesis", reg)


def test_one_manifest_reader_for_both_engines(tmp_path):
    """The rows both engines read: absolute image paths (as the synthesis copy made them), the same case paths
    (as the segmentation copy resolved them), known as a bool, and the selections of both."""
    from SegmentationModuleLib import data as seg_data
    from SynthesisModuleLib import data as syn_data
    (tmp_path / "c1").mkdir()
    (tmp_path / "manifest.csv").write_text(
        "case_id,center,known,tracer,split,full_dose,low_dose,low_dose_drf20,labels\n"
        "a,C1,1,FDG,train,c1/a_full.nii.gz,c1/a_low.nii.gz,c1/a_20.nii.gz,c1/a_lab.nii.gz\n"
        "b,C5,0,FAPI,test,c1/b_full.nii.gz,c1/b_low.nii.gz,,c1/b_lab.nii.gz\n")
    syn = syn_data.read_manifest(tmp_path / "manifest.csv")
    seg = seg_data.read_manifest(tmp_path / "manifest.csv")
    assert syn == seg
    assert syn[0]["full_dose"] == str((tmp_path / "c1" / "a_full.nii.gz").resolve())
    assert seg_data.case_path(seg[0], "low_dose_drf20") == (tmp_path / "c1" / "a_20.nii.gz").resolve()
    assert syn[0]["known"] is True and syn[1]["known"] is False
    assert [r["case_id"] for r in syn_data.select(syn, split="train", known=True)] == ["a"]
    assert [r["case_id"] for r in seg_data.select(seg, split="test", tracers="fapi")] == ["b"]
    with pytest.raises(InputError, match="has no 'low_dose_drf20'"):
        seg_data.case_path(seg[1], "low_dose_drf20")
    (tmp_path / "bad.csv").write_text("case_id,split\nx,train\n")
    with pytest.raises(InputError, match="lacks columns"):
        syn_data.read_manifest(tmp_path / "bad.csv")
    assert seg_data.read_manifest(tmp_path / "bad.csv")[0]["case_id"] == "x"


def _old_registration_hd95(x, y, sp):
    """The registration copy before: both directions pooled, then the 95th percentile."""
    from scipy import ndimage
    sx, sy = (m & ~ndimage.binary_erosion(m, border_value=0) for m in (x, y))
    d = np.concatenate([ndimage.distance_transform_edt(~sy, sampling=sp)[sx],
                        ndimage.distance_transform_edt(~sx, sampling=sp)[sy]])
    return float(np.percentile(d, 95))


def test_one_set_of_image_metrics():
    """PSNR/SSIM: the synthesis numbers unchanged, SR4ZCT's unchanged where its callers pass the HU range; HD95: the
    segmentation convention (max of the directed 95th percentiles) for registration too, which differs from its old
    pooled percentile only for asymmetric errors."""
    from PETWorkbenchLib import metrics
    from ReconstructionModuleLib import sr4zct
    from RegistrationModuleLib import metrics as reg_metrics
    from SegmentationModuleLib import metrics as seg_metrics
    from SynthesisModuleLib import metrics as syn_metrics
    rng = np.random.default_rng(0)
    ref = rng.random((12, 14, 16)) * 5
    pred = ref + rng.normal(0, 0.1, ref.shape)
    assert syn_metrics.psnr is metrics.psnr and syn_metrics.ssim is metrics.ssim and sr4zct.psnr is metrics.psnr
    assert metrics.psnr(pred, ref) == 10 * np.log10(ref.max() ** 2 / np.mean((pred - ref) ** 2))
    ct = ref * 600 - 1000
    assert abs(sr4zct.psnr(ct, ct + 3.0, 3024.0) - 20 * np.log10(3024.0 / 3.0)) < 1e-9
    a = np.zeros((40, 40, 40), bool)
    a[8:20, 8:20, 8:20] = True
    b = a.copy()
    b[8:12, 30:34, 8:12] = True                                             # a stray blob: asymmetric error
    sp = (1.0, 1.0, 1.0)
    hd, asd = metrics.hd95_asd(b, a, sp)
    assert seg_metrics.binary_metrics(b, a, sp)["hd95"] == hd
    img = lambda m: sitk.GetImageFromArray(m.astype(np.uint8))            # noqa: E731 - local helper
    ia, ib = img(a), img(b)
    ia.SetSpacing(sp[::-1])
    ib.SetSpacing(sp[::-1])
    per, _ = reg_metrics.hd95(ia, ib)
    assert per[1] == metrics.hd95_asd(a, b, sp)[0] == hd
    assert _old_registration_hd95(a, b, sp) != hd                             # the convention really changed
    shifted = np.roll(a, 3, axis=1)
    assert abs(reg_metrics.hd95(ia, img(shifted))[0][1] - _old_registration_hd95(a, shifted, sp)) < 1e-9


_OLD_TS_TO_LDOS = {
    "spleen": 1, "colon": 2, "urinary_bladder": 3, "sacrum": 4, "heart": 6, "atrial_appendage_left": 6,
    "aorta": 7, "clavicula_left": 8, "clavicula_right": 8, "femur_left": 9, "femur_right": 9,
    "hip_left": 10, "hip_right": 10, "autochthon_left": 11, "autochthon_right": 11,
    "kidney_left": 12, "kidney_right": 12, "kidney_cyst_left": 12, "kidney_cyst_right": 12,
    "brain": 13, "liver": 14, "stomach": 15, "pancreas": 16, "esophagus": 18,
}


def _old_ts_name_to_ldos(name):
    if name in _OLD_TS_TO_LDOS:
        return _OLD_TS_TO_LDOS[name]
    return 5 if name.startswith("vertebrae_") else 17 if name.startswith("lung_") else 0


def test_the_simulator_maps_anatomy_from_the_organ_list():
    """Every TotalSegmentator class of the shipped anatomy maps to the organ the previous hand-written table gave."""
    from PETWorkbenchLib.paths import resources_dir
    from ReconstructionModuleLib.organs import read_ts_label_table, ts_name_to_ldos
    names = read_ts_label_table(resources_dir() / "SampleData" / "TotalSegmentatorExampleCT" / "labels_total_v2.tsv")
    assert len(names) > 100
    assert {n: ts_name_to_ldos(n) for n in names.values()} == {n: _old_ts_name_to_ldos(n) for n in names.values()}


def test_a_new_organ_is_one_entry_in_the_terminology(tmp_path, monkeypatch):
    import json
    import shutil

    from PETWorkbenchLib import terminology
    from PETWorkbenchLib.paths import resources_dir
    from ReconstructionModuleLib.organs import ts_name_to_ldos
    src = resources_dir()
    (tmp_path / "Terminology").mkdir()
    shutil.copy(src / "Models.json", tmp_path / "Models.json")
    doc = json.loads((src / terminology.TERMINOLOGY_FILE).read_text())
    entry = dict(doc["SegmentationCodes"]["Category"][0]["Type"][0], CodeValue="69748006", CodeMeaning="Thyroid",
                 **{"3dSlicerLabel": "thyroid", "3dSlicerIntegerLabel": 19, "PETWorkbenchDisplayName": "Thyroid",
                    "PETWorkbenchSourceClasses": ["thyroid_gland"]})
    doc["SegmentationCodes"]["Category"][0]["Type"].append(entry)
    (tmp_path / terminology.TERMINOLOGY_FILE).write_text(json.dumps(doc))
    monkeypatch.setenv("PETWORKBENCH_RESOURCES", str(tmp_path))
    terminology._table.cache_clear()
    try:
        assert terminology.organ_specs(["thyroid"])[0]["value"] == 19        # segmentation, effect, report
        assert ts_name_to_ldos("thyroid_gland") == 19                        # simulator
    finally:
        monkeypatch.delenv("PETWORKBENCH_RESOURCES")
        terminology._table.cache_clear()
