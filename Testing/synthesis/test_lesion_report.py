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
    assert {"center_l_mm", "suv_peak_change_pct", "expected_change_bound_pct", "flagged"} <= set(csv[0])


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


CALIBRATION = {"a": -10.0, "b": 3.0, "volume_range_ml": [0.5, 20.0], "n_lesions": 12}
INCOMPLETE = ({"a": -5.0, "b": 1.0}, {"a": float("nan"), "b": 1.0, "volume_range_ml": [0.5, 2.0]},
              {"a": -5.0, "b": 1.0, "volume_range_ml": [0.0, 2.0]})


def test_expected_change_follows_the_fit_inside_the_measured_range():
    from SynthesisModuleLib.lesions import expected_change
    assert expected_change(CALIBRATION, 1.0) == pytest.approx(-10.0)
    assert expected_change(CALIBRATION, np.e) == pytest.approx(-7.0)
    assert expected_change(CALIBRATION, 0.05) == pytest.approx(-10.0 + 3.0 * np.log(0.5))   # held at the ends
    assert expected_change(CALIBRATION, 100.0) == pytest.approx(-10.0 + 3.0 * np.log(20.0))
    assert np.isnan(expected_change(None, 1.0)) and np.isnan(expected_change({}, 1.0))
    for bad in INCOMPLETE:                                  # an incomplete calibration is no calibration, no crash
        assert np.isnan(expected_change(bad, 1.0))
    assert np.isnan(expected_change(CALIBRATION, float("nan")))


def _calibration_with_lesions(n=14, sd=1.8, seed=0):
    from SynthesisModuleLib.evaluate import calibration_from_hot_spots
    rng = np.random.default_rng(seed)
    vol = np.exp(rng.uniform(np.log(0.3), np.log(13.0), n))
    return calibration_from_hot_spots([(float(v), float(-6.0 + 1.8 * np.log(v) + rng.normal(0, sd)), f"c{i}")
                                       for i, v in enumerate(vol)])


def test_expected_change_bound_is_the_one_sided_confidence_bound_of_the_fitted_mean():
    """Against an independent computation (numpy's polyfit covariance of the coefficients): the lower 95 % bound
    of the line's mean at a volume; below the point estimate, widest far from the lesions' mean log volume, held
    at the ends of the measured range, narrower with more lesions; NaN without the calibration's lesions."""
    from scipy import stats

    from SynthesisModuleLib.lesions import expected_change, expected_change_bound
    cal = _calibration_with_lesions()
    x = np.log([h["volume_ml"] for h in cal["hot_spots"]])
    c = np.array([h["suv_peak_change_pct"] for h in cal["hot_spots"]])
    coef, cov = np.polyfit(x, c, 1, cov=True)                      # cov scaled by the residual variance (n - 2)
    for vol in (0.5, 1.0, 2.44, 8.0):
        x0 = np.log(vol)
        se = float(np.sqrt(np.array([x0, 1.0]) @ cov @ np.array([x0, 1.0])))
        ref = float(np.polyval(coef, x0)) - stats.t.ppf(0.95, len(x) - 2) * se
        assert expected_change_bound(cal, vol) == pytest.approx(ref, abs=0.01)   # a, b stored rounded
        assert expected_change_bound(cal, vol) < expected_change(cal, vol)
    mid = float(np.exp(x.mean()))
    gap = [expected_change(cal, v) - expected_change_bound(cal, v) for v in (mid, 0.4)]
    assert gap[1] > gap[0]
    lo, hi = cal["volume_range_ml"]
    assert expected_change_bound(cal, hi * 10) == pytest.approx(expected_change_bound(cal, hi))
    more = _calibration_with_lesions(n=200)
    assert (expected_change(more, 2.0) - expected_change_bound(more, 2.0)) < 0.5 * gap[0]
    assert np.isnan(expected_change_bound(CALIBRATION, 1.0)) and np.isnan(expected_change_bound(None, 1.0))
    assert expected_change_bound(cal, lo / 10) == pytest.approx(expected_change_bound(cal, lo))
    same = {**cal, "hot_spots": [{**h, "volume_ml": 1.0} for h in cal["hot_spots"]]}       # no spread of volumes
    moved = {**cal, "a": cal["a"] + 1.0}                             # a line that is not the fit of its lesions
    for bad in (same, moved, {**cal, "hot_spots": cal["hot_spots"][:2]}, {**cal, "hot_spots": [None]}):
        assert np.isnan(expected_change_bound(bad, 2.0))


def test_calibration_fit_recovers_a_known_line_and_refuses_too_few_lesions():
    from SynthesisModuleLib.evaluate import calibration_from_hot_spots
    rng = np.random.default_rng(0)
    vol = np.exp(rng.uniform(np.log(0.3), np.log(30.0), 40))
    found = [(float(v), float(-8.0 + 2.0 * np.log(v) + rng.normal(0, 0.5)), f"c{i}") for i, v in enumerate(vol)]
    cal = calibration_from_hot_spots(found)
    assert cal["a"] == pytest.approx(-8.0, abs=0.3) and cal["b"] == pytest.approx(2.0, abs=0.2)
    assert cal["residual_sd_pct"] == pytest.approx(0.5, abs=0.2) and cal["n_lesions"] == 40
    assert cal["volume_range_ml"][0] == pytest.approx(vol.min(), abs=1e-3)
    assert sum(b["n"] for b in cal["bins"]) <= 40 and all(b["n"] >= 3 for b in cal["bins"])
    with pytest.raises(InputError, match="at least 5"):
        calibration_from_hot_spots(found[:4])


def test_calibration_without_its_lesions_flags_by_its_line_at_a_size_it_flattens():
    """A 7 % SUVpeak loss of the 13 mm sphere (about 1 ml above the threshold; the 10 mm one is not a measurable
    hot spot in this noise realisation) is within the input's noise (criterion 1 does not fire); with a calibration
    that says lesions of that size lose > 5 % it is flagged, the 37 mm sphere with the same loss is not (its size
    is not flattened), and nothing is flagged by size when the spot did not lose > 5 %."""
    truth, noisy, centres = _phantom(seed=5)
    out = noisy.copy()
    z, y, x = np.meshgrid(*[np.arange(n) * SP for n in truth.shape], indexing="ij")
    for d, p in ((13.0, centres[1]), (37.0, centres[5])):
        near = (z - p[0]) ** 2 + (y - p[1]) ** 2 + (x - p[2]) ** 2 < (d * 0.75) ** 2
        out[near] *= 0.93
    plain = lesion_change_report(_img(noisy), _img(out), threshold_suv=2.5)
    cal = lesion_change_report(_img(noisy), _img(out), threshold_suv=2.5, calibration=CALIBRATION)
    r13p, r13 = _row_at(plain, centres[1]), _row_at(cal, centres[1])
    assert r13p["volume_ml"] < 1.5
    assert r13p["suv_peak_change_pct"] == pytest.approx(-7.0, abs=0.5) and r13p["noise_se_pct"] > 3.5
    assert not r13p["flagged"] and r13p["expected_change_pct"] is None and r13p["flag_reason"] == ""
    assert "no lesion calibration" in plain["rule"] and "12 lesions" in cal["rule"]
    assert r13["flagged"] and r13["flag_reason"].startswith("lesions of this size")
    assert r13["expected_change_pct"] < -5
    for bad in INCOMPLETE:
        rep = lesion_change_report(_img(noisy), _img(out), threshold_suv=2.5, calibration=bad)
        assert not _row_at(rep, centres[1])["flagged"] and "no lesion calibration" in rep["rule"]
    r37 = _row_at(cal, centres[5])
    assert r37["suv_peak_change_pct"] < -5 and r37["expected_change_pct"] > -5 and not r37["flagged"]
    same = lesion_change_report(_img(noisy), _img(noisy), threshold_suv=2.5, calibration=CALIBRATION)
    assert same["n_flagged"] == 0


def test_model_calibration_belongs_to_exact_registered_weights(tmp_path):
    import shutil
    from PETWorkbenchLib import models
    from SynthesisModuleLib.lesions import model_calibration
    e = models.get(models.default_model("synthesis"))
    cal = e.extra.get("lesion_calibration")
    assert cal and cal["weights_sha256"] == e.sha256 and cal["n_lesions"] >= 5   # the shipped model is calibrated
    assert model_calibration(e.id) == cal
    assert model_calibration("no-such-model") is None
    renamed = tmp_path / "my_copy.pt"                  # the same weights under any name: the same calibration
    shutil.copy(e.cached_path(), renamed)
    assert model_calibration(str(renamed)) == cal
    copy = tmp_path / e.filename
    shutil.copy(e.cached_path(), copy)
    copy.write_bytes(copy.read_bytes() + b"\0")            # registered name, other weights: not this calibration
    assert model_calibration(str(copy)) is None
    assert model_calibration(str(tmp_path / "missing.pt")) is None
    assert model_calibration({"config": {}, "state_dict": {}}) is None


def test_upsert_keeps_the_calibration_of_unchanged_weights(tmp_path):
    """Re-measuring a model (benchmarks rewrite its whole entry) keeps the lesion calibration measured on the same
    weights, and drops it when the weights change."""
    import json
    from PETWorkbenchLib import models
    reg = tmp_path / "Models.json"
    src = json.loads((models.resources_dir() / "Models.json").read_text())
    entry = next(m for m in src["models"] if m.get("lesion_calibration"))
    reg.write_text(json.dumps({"models": [entry]}))
    bare = {k: v for k, v in entry.items() if k != "lesion_calibration"}
    models.upsert_entries([dict(bare, metrics={"psnr": 1.0})], path=reg)
    kept = json.loads(reg.read_text())["models"][0]
    assert kept["lesion_calibration"] == entry["lesion_calibration"] and kept["metrics"] == {"psnr": 1.0}
    models.upsert_entries([dict(bare, sha256="0" * 64)], path=reg)
    assert "lesion_calibration" not in json.loads(reg.read_text())["models"][0]


def test_lesion_calibration_measures_what_the_model_does_to_true_lesions(tmp_path, monkeypatch):
    """Six cases, one true lesion each (radius 5-10 mm); a 'model' that lowers everything by 10 % gives the line
    a = -10 %, b = 0 over the lesions' hot spots. Hot spots outside the true lesions are not counted."""
    import csv
    import SynthesisModuleLib.infer as infer
    from SynthesisModuleLib.evaluate import lesion_calibration
    rows = []
    zz, yy, xx = np.meshgrid(*[np.arange(24) * SP] * 3, indexing="ij")
    for i, r in enumerate((5.0, 6.0, 7.0, 8.0, 9.0, 10.0)):
        a = np.ones((24, 24, 24))
        les = ((zz - 24) ** 2 + (yy - 24) ** 2 + (xx - 24) ** 2 < r * r).astype(np.uint8)
        a[les > 0] = 8.0
        a[2:5, 2:5, 2:5] = 6.0                                  # a hot spot that is not a true lesion
        sitk.WriteImage(_img(a), str(tmp_path / f"c{i}_low.nii.gz"))
        sitk.WriteImage(sitk.Cast(_img(les), sitk.sitkUInt8), str(tmp_path / f"c{i}_les.nii.gz"))
        rows.append({"case_id": f"c{i}", "center": "A", "known": 1, "tracer": "FDG", "split": "test",
                     "low_dose": f"c{i}_low.nii.gz", "full_dose": f"c{i}_low.nii.gz", "lesions": f"c{i}_les.nii.gz"})
    with open(tmp_path / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    monkeypatch.setattr(infer, "synthesize", lambda image, model, **k: (image * 0.9, {}))
    cal = lesion_calibration("any", tmp_path / "manifest.csv")
    assert cal["n_lesions"] == 6 and cal["n_cases"] == 6
    assert cal["a"] == pytest.approx(-10.0, abs=0.01) and cal["b"] == pytest.approx(0.0, abs=0.01)
    vols = sorted(h["volume_ml"] for h in cal["hot_spots"])
    assert vols[0] == pytest.approx(4 / 3 * np.pi * 0.5 ** 3, rel=0.5) and vols[-1] > vols[0] * 5


def test_cli_with_a_registered_model_uses_its_calibration(tmp_path, capfd):
    import json
    from PETWorkbenchApp.cli import main
    from PETWorkbenchLib import models
    _, noisy, _ = _phantom(seed=6)
    inp = tmp_path / "low.nii.gz"
    sitk.WriteImage(_img(noisy[10:30, 10:100, 10:100]), str(inp))
    mid = models.default_model("synthesis")
    code = main(["--json", "synthesize", str(inp), str(tmp_path / "out.nii.gz"), "--model", mid, "--device", "cpu",
                 "--lesions", str(tmp_path / "les.json"), "--lesion-threshold", "2.5"])
    out, err = capfd.readouterr()
    assert code in (0, None), err
    rep = json.loads((tmp_path / "les.json").read_text())
    n = models.get(mid).extra["lesion_calibration"]["n_lesions"]
    assert f"lesion calibration ({n} lesions" in rep["rule"] and rep["lesions"]
    assert all(isinstance(r["expected_change_pct"], float) for r in rep["lesions"])
    assert "95 % confidence bound" in rep["rule"]               # the shipped calibration stores its lesions
    assert all(r["expected_change_bound_pct"] < r["expected_change_pct"] for r in rep["lesions"])
    assert "NaN" not in (tmp_path / "les.json").read_text()


def test_calibration_is_refused_for_an_image_made_by_other_weights():
    from PETWorkbenchLib import models
    from SynthesisModuleLib.lesions import model_calibration
    e = models.get(models.default_model("synthesis"))
    assert model_calibration(e.id, e.sha256) == e.extra["lesion_calibration"]
    assert model_calibration(e.id, "0" * 64) is None


def test_size_criterion_uses_the_confidence_bound_when_the_calibration_has_its_lesions():
    """A 6 % loss at a volume where the fitted line predicts a loss under 5 % but its 95 % bound does not clear
    5 % is flagged by size; the same loss where even the bound is above -5 % is not. Without the calibration's
    lesions the line itself decides (the earlier rule)."""
    from SynthesisModuleLib.lesions import expected_change, expected_change_bound
    truth, noisy, centres = _phantom(seed=5)
    out = noisy.copy()
    z, y, x = np.meshgrid(*[np.arange(n) * SP for n in truth.shape], indexing="ij")
    p = centres[1]
    out[(z - p[0]) ** 2 + (y - p[1]) ** 2 + (x - p[2]) ** 2 < (13.0 * 0.75) ** 2] *= 0.94
    row = _row_at(lesion_change_report(_img(noisy), _img(out), threshold_suv=2.5), centres[1])
    v = row["volume_ml"]
    assert row["suv_peak_change_pct"] < -5 and not row["flagged"]
    base = _calibration_with_lesions()
    # shift the calibration so that, at this hot spot's volume, the line is at -4.5 % (inside the tolerance)
    shift = -4.5 - expected_change(base, v)
    cal = {**base, "a": base["a"] + shift,
           "hot_spots": [{**h, "suv_peak_change_pct": h["suv_peak_change_pct"] + shift} for h in base["hot_spots"]]}
    assert expected_change(cal, v) == pytest.approx(-4.5, abs=1e-6) and expected_change_bound(cal, v) < -5
    r = _row_at(lesion_change_report(_img(noisy), _img(out), threshold_suv=2.5, calibration=cal), centres[1])
    assert r["flagged"] and r["flag_reason"].startswith("lesions of this size")
    assert r["expected_change_bound_pct"] == pytest.approx(expected_change_bound(cal, v))
    no_points = {k: val for k, val in cal.items() if k != "hot_spots"}
    r = _row_at(lesion_change_report(_img(noisy), _img(out), threshold_suv=2.5, calibration=no_points), centres[1])
    assert not r["flagged"] and r["expected_change_bound_pct"] is None
    rule_line = lesion_change_report(_img(noisy), _img(out), threshold_suv=2.5, calibration=no_points)["rule"]
    assert "without a confidence bound" in rule_line and "95 % confidence bound" not in rule_line
    high = {**cal, "a": cal["a"] + 4.0,
            "hot_spots": [{**h, "suv_peak_change_pct": h["suv_peak_change_pct"] + 4.0} for h in cal["hot_spots"]]}
    assert expected_change_bound(high, v) > -5
    assert not _row_at(lesion_change_report(_img(noisy), _img(out), threshold_suv=2.5, calibration=high),
                       centres[1])["flagged"]
