"""Lesion-change report: hot spots of the input, SUVmax/peak/mean in and out, and the noise-based flag rule."""

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.metrics import percist_liver_threshold
from SynthesisModuleLib.lesions import lesion_change_report, report_rows

SP = 2.0
DIAMETERS = (10.0, 13.0, 17.0, 22.0, 28.0, 37.0)


def _phantom(seed=0, cov=0.3):
    """NEMA-like: warm cylinder (SUV 1) with six spheres (SUV 4) on a ring; noisy input (noise proportional to the
    signal, correlated over ~1 voxel) and its noise-free truth."""
    shape = (40, 110, 110)
    z, y, x = np.meshgrid(*[np.arange(n) * SP for n in shape], indexing="ij")
    c = np.array([40.0, 110.0, 110.0])
    body = (y - c[1]) ** 2 + (x - c[2]) ** 2 < 100.0 ** 2
    truth = body.astype(np.float64)
    centres = []
    for i, d in enumerate(DIAMETERS):
        a = 2 * np.pi * i / len(DIAMETERS)
        p = (c[0], c[1] + 57.2 * np.sin(a), c[2] + 57.2 * np.cos(a))
        truth[(z - p[0]) ** 2 + (y - p[1]) ** 2 + (x - p[2]) ** 2 < (d / 2) ** 2] = 4.0
        centres.append(p)
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 0.8)
    noise /= noise.std()
    noisy = np.maximum(truth * (1 + cov * noise), 0)
    return truth, noisy, centres


def _img(a):
    im = sitk.GetImageFromArray(a.astype(np.float32))
    im.SetSpacing((SP, SP, SP))
    return im


def _row_at(rep, p):
    lps = np.array([p[2], p[1], p[0]])
    return min(rep["lesions"], key=lambda r: np.linalg.norm(np.array(r["center_lps"]) - lps))


def test_flattened_small_lesions_are_flagged_and_denoised_large_ones_are_not():
    truth, noisy, centres = _phantom()
    out = truth.copy()  # an ideal denoiser ...
    for d, p in zip(DIAMETERS[:2], centres[:2]):  # ... that flattens the two smallest spheres
        z, y, x = np.meshgrid(*[np.arange(n) * SP for n in truth.shape], indexing="ij")
        near = (z - p[0]) ** 2 + (y - p[1]) ** 2 + (x - p[2]) ** 2 < (d * 1.5) ** 2
        out[near] = ndimage.gaussian_filter(truth, 3.0)[near] * 0.8 + 0.2
    rep = lesion_change_report(_img(noisy), _img(out), threshold_suv=2.5)
    assert rep["threshold"]["suv"] == 2.5 and "SE" in rep["rule"]
    rows = {d: _row_at(rep, p) for d, p in zip(DIAMETERS, centres)}
    assert rows[10.0]["flagged"] and rows[13.0]["flagged"]
    assert rows[10.0]["suv_peak_change_pct"] < -10
    for d in (22.0, 28.0, 37.0):
        assert not rows[d]["flagged"], (d, rows[d])
    assert rows[37.0]["suv_max_change_pct"] < -10  # denoising lowers SUVmax: why SUVmax is not the criterion
    assert abs(rows[37.0]["volume_ml"] - 4 / 3 * np.pi * 1.85 ** 3) < 0.35 * 26.5
    assert all(r["noise_se_pct"] > 0 for r in rep["lesions"])
    csv = report_rows(rep)
    assert {"center_l_mm", "suv_peak_change_pct", "flagged"} <= set(csv[0])


def test_identity_output_flags_nothing_and_values_match():
    _, noisy, _ = _phantom(seed=1)
    rep = lesion_change_report(_img(noisy), _img(noisy), threshold_suv=2.5)
    assert rep["n_hot_spots"] >= 5 and rep["n_flagged"] == 0
    r = rep["lesions"][0]
    assert r["suv_peak_in"] == r["suv_peak_out"] and r["suv_max_change_pct"] == 0.0
    assert r["suv_max_in"] >= r["suv_peak_in"] >= 0  # peak is a sphere mean, at most the max


def test_percist_threshold_from_a_liver_mask_and_errors():
    truth, noisy, _ = _phantom(seed=2)
    liver = np.zeros(truth.shape, np.uint8)
    liver[10:30, 90:110, 40:60] = 1  # warm background region as "liver"
    rep = lesion_change_report(_img(noisy), _img(truth), liver_mask=_img(liver))
    vals = noisy[ndimage.binary_erosion(liver.astype(bool))]
    assert rep["threshold"]["suv"] == pytest.approx(percist_liver_threshold(vals))
    assert rep["threshold"]["method"].startswith("PERCIST")
    with pytest.raises(InputError, match="grid"):
        lesion_change_report(_img(noisy), _img(truth[:-1]))
    empty = lesion_change_report(_img(truth * 0 + 1), _img(truth * 0 + 1), threshold_suv=2.5)
    assert empty["lesions"] == [] and empty["n_flagged"] == 0


def test_cli_writes_the_report_and_summarises_it(tmp_path, tiny_models, capfd):
    import csv
    import json
    from PETWorkbenchApp.cli import main
    truth, noisy, _ = _phantom(seed=4)
    inp = tmp_path / "low.nii.gz"
    sitk.WriteImage(_img(noisy[10:30, 10:100, 10:100]), str(inp))
    liver = np.zeros((20, 90, 90), np.uint8)
    liver[2:18, 70:88, 30:60] = 14  # an organ label map whose liver is warm background
    sitk.WriteImage(sitk.Cast(_img(liver), sitk.sitkUInt8), str(tmp_path / "organs.nii.gz"))
    code = main(["--json", "synthesize", str(inp), str(tmp_path / "out.nii.gz"), "--model", tiny_models["synthesis"],
                 "--device", "cpu", "--lesions", str(tmp_path / "les.csv"), "--liver-mask",
                 str(tmp_path / "organs.nii.gz")])
    out, err = capfd.readouterr()
    assert code in (0, None), err
    summary = json.loads(out)
    les = summary["lesions"]
    assert les["threshold"]["method"].startswith("PERCIST") and les["n_hot_spots"] >= 3
    rows = list(csv.DictReader(open(tmp_path / "les.csv")))
    assert len(rows) == les["n_hot_spots"] and {"center_l_mm", "suv_peak_change_pct", "flagged"} <= set(rows[0])
    code = main(["synthesize", str(inp), str(tmp_path / "out2.nii.gz"), "--model", tiny_models["synthesis"],
                 "--device", "cpu", "--liver-mask", str(inp)])
    err = capfd.readouterr().err
    assert code == 2 and "liver" in err and len(err.strip().splitlines()) == 1
