"""Tests of the reconstruction engine: projector adjoint, OSEM, thinning, image-domain low dose, data generator."""

import csv
import math

import numpy as np
import pytest


torch = pytest.importorskip("torch")
sitk = pytest.importorskip("SimpleITK")

from PETWorkbenchLib.errors import Cancelled, InputError
from ReconstructionModuleLib.lowdose import poisson_sample, thin_counts
from ReconstructionModuleLib.osem import mlem, osem
from ReconstructionModuleLib.projector import PETSystem, ParallelProjector, gaussian_filter_3d

torch.set_num_threads(1)


def disc_phantom(n=48, nz=3, hot=4.0, r_body=0.42, r_hot=0.14, offset=(0.12, 0.0)):
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2
    rr = np.hypot(xx - c, yy - c) / n
    img = np.where(rr < r_body, 1.0, 0.0)
    rh = np.hypot(xx - c - offset[0] * n, yy - c - offset[1] * n) / n
    img[rh < r_hot] = hot
    bg_roi = (np.hypot(xx - c + 0.2 * n, yy - c) / n) < 0.08
    hot_roi = rh < r_hot * 0.5
    return np.repeat(img[None], nz, 0).astype(np.float32), hot_roi, bg_roi


# ---------------------------------------------------------------------------------------------------- projector
@pytest.mark.parametrize("n_subsets", [1, 5])
def test_projector_exact_adjoint(n_subsets):
    P = ParallelProjector(37, 29, 2.5, n_subsets=n_subsets, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 29, 37, generator=g, dtype=torch.float64)
    y = torch.rand(4, P.n_angles, P.n_bins, generator=g, dtype=torch.float64)
    lhs = float((P.forward(x) * y).sum())
    rhs = float((x * P.back(y)).sum())
    assert abs(lhs - rhs) / abs(lhs) < 1e-5
    for k in range(n_subsets):  # each subset pair is adjoint too
        yk = P.subset_of(y, k)
        assert abs(float((P.forward(x, k) * yk).sum()) - float((x * P.back(yk, k)).sum())) / \
            float((P.forward(x, k) * yk).sum()) < 1e-5


def test_system_with_psf_attenuation_norm_is_adjoint():
    g = torch.Generator().manual_seed(2)
    mu = torch.rand(5, 24, 24, generator=g, dtype=torch.float64) * 0.01
    sysm = PETSystem((5, 24, 24), (3.0, 2.0, 2.0), psf_fwhm_mm=(4.0, 5.0, 5.0), mu=mu, n_subsets=3,
                     dtype=torch.float64, norm=torch.rand(1, 1, 1, generator=g, dtype=torch.float64) + 0.5)
    x = torch.rand(sysm.shape, generator=g, dtype=torch.float64)
    y = torch.rand(sysm.sino_shape, generator=g, dtype=torch.float64)
    lhs, rhs = float((sysm.forward(x) * y).sum()), float((x * sysm.back(y)).sum())
    assert abs(lhs - rhs) / abs(lhs) < 1e-5


def test_line_integrals_are_physical():
    # a uniform disc of radius R (mm) and value 1: the central line integral is its chord length 2R
    n, pix = 64, 2.0
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2
    R = 40.0
    img = (np.hypot(xx - c, yy - c) * pix < R).astype(np.float32)[None]
    P = ParallelProjector(n, n, pix, n_angles=12, n_bins=n + 2)
    s = P.forward(torch.from_numpy(img))[0]
    centre = s[:, (P.n_bins - 1) // 2: (P.n_bins - 1) // 2 + 2].mean()
    assert abs(float(centre) - 2 * R) / (2 * R) < 0.05
    # every view sees the same total activity (area in mm^2 times pixel size in mm... = sum * pix^2 / bin)
    tot = s.sum(1) * P.bin_mm
    assert float(tot.std() / tot.mean()) < 1e-3
    assert abs(float(tot.mean()) - img.sum() * pix * pix) / (img.sum() * pix * pix) < 1e-3


def test_attenuation_factors_from_mu_map():
    # uniform water cylinder (mu 0.0096 /mm, radius 50 mm): central line attenuation = exp(-mu * 100 mm)
    n, pix = 64, 2.0
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2
    mu = np.where(np.hypot(xx - c, yy - c) * pix < 50.0, 0.0096, 0.0).astype(np.float32)[None]
    sysm = PETSystem((1, n, n), (2.0, pix, pix), mu=mu, n_angles=8, n_bins=n + 2)
    centre = sysm.mult[0, :, (sysm.proj.n_bins - 1) // 2: (sysm.proj.n_bins - 1) // 2 + 2].mean()
    assert abs(float(centre) - math.exp(-0.0096 * 100.0)) < 0.03


def test_psf_is_normalised_and_has_requested_fwhm():
    x = torch.zeros(1, 1, 101)
    x[0, 0, 50] = 1.0
    y = gaussian_filter_3d(x, (0, 0, 8.0), (1.0, 1.0, 1.0))[0, 0]
    assert abs(float(y.sum()) - 1.0) < 1e-5
    half = float(y.max()) / 2
    above = (y >= half).nonzero().ravel()
    width = float(above[-1] - above[0] + 1)
    assert 7.0 <= width <= 9.0


def test_geometry_mismatch_is_reported():
    sysm = PETSystem((2, 16, 16), (2.0, 2.0, 2.0))
    with pytest.raises(InputError, match="does not match"):
        sysm.forward(torch.ones(2, 16, 17))
    with pytest.raises(InputError, match="does not match"):
        osem(sysm, torch.ones(2, 5, 7))
    with pytest.raises(InputError, match="square"):
        PETSystem((2, 16, 16), (2.0, 2.0, 3.0))


# --------------------------------------------------------------------------------------------------------- OSEM
def test_noise_free_osem_recovers_4_to_1_contrast():
    img, hot_roi, bg_roi = disc_phantom()
    sysm = PETSystem(img.shape, (2.0, 2.0, 2.0), n_subsets=6)
    y = sysm.forward(torch.from_numpy(img))
    x = osem(sysm, y, n_iter=20).numpy()
    ratio = x[:, hot_roi].mean() / x[:, bg_roi].mean()
    assert abs(ratio - 4.0) / 4.0 < 0.02, ratio
    # quantitative too: background level is 1
    assert abs(x[:, bg_roi].mean() - 1.0) < 0.03


def test_osem_with_psf_attenuation_and_additive_term():
    img, hot_roi, bg_roi = disc_phantom(n=40, nz=2)
    mu = (img > 0) * 0.0096
    sysm = PETSystem(img.shape, (2.0, 2.0, 2.0), psf_fwhm_mm=3.0, mu=mu, n_subsets=4)
    t = sysm.forward(torch.from_numpy(img))
    r = torch.full(sysm.sino_shape, 0.3 * float(t.mean()))
    y = t + r
    x_ok = osem(sysm, y, r, n_iter=25).numpy()
    x_bad = osem(sysm, y, None, n_iter=25).numpy()  # ignoring randoms+scatter adds a spurious background
    outside = img == 0
    assert abs(x_ok[:, bg_roi].mean() - 1.0) < 0.05
    assert x_ok[outside].mean() < 0.03
    assert x_bad[outside].mean() > 3 * x_ok[outside].mean() + 0.05


def test_mlem_and_osem_agree_and_subsets_accelerate():
    img, hot_roi, bg_roi = disc_phantom(n=32, nz=1)
    s1 = PETSystem(img.shape, (2.0, 2.0, 2.0), n_subsets=1)
    s8 = PETSystem(img.shape, (2.0, 2.0, 2.0), n_subsets=8)
    y = s1.forward(torch.from_numpy(img))
    err = lambda x: float(np.abs(x.numpy() - img).mean())
    e_ml2, e_os2 = err(mlem(s1, y, n_iter=2)), err(osem(s8, y, n_iter=2))
    assert e_os2 < e_ml2  # 8 subsets: ~8x the updates for the same number of passes
    with pytest.raises(InputError, match="one subset"):
        mlem(s8, y)


def test_osem_progress_cancel_and_post_filter():
    img, _, _ = disc_phantom(n=24, nz=1)
    sysm = PETSystem(img.shape, (2.0, 2.0, 2.0), n_subsets=4)
    y = sysm.forward(torch.from_numpy(img))
    seen = []
    osem(sysm, y, n_iter=2, progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and all(b >= a for a, b in zip(seen, seen[1:]))
    assert len(seen) == 2 * 4 + 1
    with pytest.raises(Cancelled):
        osem(sysm, y, n_iter=2, cancel=lambda: len(seen) > 3, progress=lambda f, m: seen.append(f))
    raw = osem(sysm, y, n_iter=2)
    filt = osem(sysm, y, n_iter=2, post_filter_fwhm_mm=6.0)
    assert float(filt.std()) < float(raw.std())


def test_osem_rejects_zero_counts_and_bad_values():
    sysm = PETSystem((1, 16, 16), (2.0, 2.0, 2.0))
    with pytest.raises(InputError, match="zero counts"):
        osem(sysm, torch.zeros(sysm.sino_shape))
    with pytest.raises(InputError, match="negative"):
        osem(sysm, -torch.ones(sysm.sino_shape))
    with pytest.raises(InputError, match="iterations"):
        osem(sysm, torch.ones(sysm.sino_shape), n_iter=0)


# ------------------------------------------------------------------------------------------------------ thinning
def test_thinning_mean_and_variance_are_poisson():
    lam = 50.0
    counts = poisson_sample(np.full(400_000, lam), seed=3)
    for drf in (2.0, 4.0, 10.0):
        t = thin_counts(counts, drf, seed=4)
        assert abs(t.mean() - lam / drf) / (lam / drf) < 0.01
        assert abs(t.var() - lam / drf) / (lam / drf) < 0.03  # Poisson: variance == mean
        assert np.all(t <= counts)


def test_thinning_is_deterministic_and_validates():
    c = poisson_sample(np.full(1000, 5.0), seed=1)
    assert np.array_equal(thin_counts(c, 4, seed=7), thin_counts(c, 4, seed=7))
    assert not np.array_equal(thin_counts(c, 4, seed=7), thin_counts(c, 4, seed=8))
    with pytest.raises(InputError, match="DRF"):
        thin_counts(c, 0.5)
    with pytest.raises(InputError, match="zero counts"):
        thin_counts(np.zeros(10), 4)
    with pytest.raises(InputError, match="integer"):
        thin_counts(np.full(10, 2.5), 4)


def test_background_noise_grows_like_sqrt_drf():
    n = 40
    img, _, _ = disc_phantom(n=n, nz=6, hot=1.0)
    yy, xx = np.mgrid[0:n, 0:n]
    roi = np.hypot(xx - (n - 1) / 2, yy - (n - 1) / 2) < 0.25 * n
    sysm = PETSystem(img.shape, (2.0, 2.0, 2.0), n_subsets=4)
    ybar = sysm.forward(torch.from_numpy(img))
    ybar = ybar * (2e6 / float(ybar.sum()))
    prompts = poisson_sample(ybar, seed=0)
    cov = {}
    for drf in (1, 4, 16):
        y = prompts if drf == 1 else thin_counts(prompts, drf, seed=drf)
        x = osem(sysm, y, n_iter=3).numpy()
        v = x[:, roi]
        cov[drf] = v.std() / v.mean()
    r4, r16 = cov[4] / cov[1], cov[16] / cov[1]
    assert 1.6 < r4 < 2.5, cov
    assert 3.0 < r16 < 5.0, cov


# ----------------------------------------------------------------------------------------- image-domain low dose
def test_image_domain_lowdose_is_deterministic_and_noisier():
    from ReconstructionModuleLib.imagedomain import simulate_lowdose_image
    img, _, bg = disc_phantom(n=32, nz=4)
    im = sitk.GetImageFromArray(img)
    im.SetSpacing((3.0, 3.0, 3.0))
    a = simulate_lowdose_image(im, 10, counts_per_cm=2e5, n_iter=2, n_subsets=4, seed=5)
    b = simulate_lowdose_image(im, 10, counts_per_cm=2e5, n_iter=2, n_subsets=4, seed=5)
    la, lb = sitk.GetArrayFromImage(a["low_dose"]), sitk.GetArrayFromImage(b["low_dose"])
    assert np.array_equal(la, lb)
    fa = sitk.GetArrayFromImage(a["full_dose"])
    assert abs(a["prompts_low"] / a["prompts"] - 0.1) < 0.01
    assert la[:, bg].std() > 1.5 * fa[:, bg].std()
    assert abs(la[:, bg].mean() - 1.0) < 0.15  # stays in the input units
    with pytest.raises(InputError, match="DRF"):
        simulate_lowdose_image(im, 0.9)
    with pytest.raises(InputError, match="zero counts"):
        simulate_lowdose_image(sitk.GetImageFromArray(np.zeros((2, 8, 8), np.float32)), 4)


# ------------------------------------------------------------------------------------------ organs + simulation
def test_ldos_table_and_totalsegmentator_mapping():
    from ReconstructionModuleLib.organs import LDOS_ORGANS, ts_name_to_ldos
    assert [v for v, _ in LDOS_ORGANS] == list(range(1, 19))
    assert dict(LDOS_ORGANS)[13] == "brain" and dict(LDOS_ORGANS)[17] == "lung"
    assert ts_name_to_ldos("lung_middle_lobe_right") == 17
    assert ts_name_to_ldos("vertebrae_T7") == 5
    assert ts_name_to_ldos("kidney_left") == ts_name_to_ldos("kidney_right") == 12
    assert ts_name_to_ldos("femur_left") == 9 and ts_name_to_ldos("hip_right") == 10
    assert ts_name_to_ldos("gallbladder") == 0


def test_hu_to_mu_bilinear():
    from ReconstructionModuleLib.simulate import hu_to_mu
    mu = hu_to_mu(np.array([-1000.0, 0.0, 47.0, 1000.0]))
    assert abs(mu[0]) < 1e-6 and abs(mu[1] - 0.0096) < 1e-5
    assert abs(mu[2] - (9.6e-5 * 1047) / 10) < 1e-6
    # above the break point the slope is smaller than the water line (bone)
    assert mu[3] < 0.0096 * 2
    with pytest.raises(InputError, match="kVp"):
        hu_to_mu(0, kvp=80)


def test_center_profiles_mirror_drmc_table1():
    from ReconstructionModuleLib.simulate import CENTERS
    assert set(CENTERS) == {"C1", "C2", "C3", "C4", "C5", "C6"}
    assert [CENTERS[c]["drf"] for c in ("C1", "C2", "C3", "C4", "C5", "C6")] == [12, 4, 10, 10, 4, 12]
    assert CENTERS["C3"]["spacing"] == (1.67, 1.67, 2.89) and CENTERS["C4"]["spacing"] == (1.65, 1.65, 1.65)
    assert not CENTERS["C5"]["known"] and CENTERS["C5"]["region"] == "brain" and not CENTERS["C5"]["lesions"]
    assert not CENTERS["C6"]["known"] and CENTERS["C1"]["known"]


def _anatomy_available():
    from ReconstructionModuleLib.simulate import shared_data_dir
    return (shared_data_dir() / "totalsegmentator_example_ct" / "example_ct.nii.gz").exists()


@pytest.mark.skipif(not _anatomy_available(), reason="shared example CT not available")
def test_generate_dataset_small(tmp_path):
    from ReconstructionModuleLib.simulate import MANIFEST_COLUMNS, generate_dataset
    kw = dict(centers=["C2"], tracers=("FDG", "FAPI"), extra_drfs=(20,), seed=11, n_test=1, max_slices=10,
              max_voxels=60_000, second_tracer_every=2)
    man = generate_dataset(tmp_path / "a", 2, **kw)
    rows = list(csv.DictReader(open(man)))
    assert set(MANIFEST_COLUMNS) <= set(rows[0])
    assert [r["tracer"] for r in rows] == ["FDG", "FAPI", "FDG"] and {r["split"] for r in rows} == {"train", "test"}
    assert {r["tracer"] for r in rows} == {"FDG", "FAPI"} and all(r["units"] == "SUV" for r in rows)
    r = rows[0]
    d = man.parent
    full = sitk.ReadImage(str(d / r["full_dose"]))
    low = sitk.ReadImage(str(d / r["low_dose"]))
    low20 = sitk.ReadImage(str(d / r["low_dose_drf20"]))
    lab = sitk.ReadImage(str(d / r["labels"]))
    ct = sitk.ReadImage(str(d / r["ct"]))
    les = sitk.ReadImage(str(d / r["lesions"]))
    for im in (low, low20, lab, ct, les):
        assert im.GetSize() == full.GetSize() and np.allclose(im.GetSpacing(), full.GetSpacing())
    assert np.allclose(full.GetSpacing(), (3.12, 3.12, 1.75))
    f, lo, l20 = (sitk.GetArrayFromImage(x) for x in (full, low, low20))
    labs = sitk.GetArrayFromImage(lab)
    assert set(np.unique(labs)) <= set(range(19)) and len(np.unique(labs)) > 3
    # same mean activity (SUV) at every dose, more noise at lower dose
    assert abs(lo.mean() / f.mean() - 1) < 0.05 and abs(l20.mean() / f.mean() - 1) < 0.05
    body = sitk.GetArrayFromImage(ct) > -300
    hp = lambda a: np.abs(a - sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(a), 2.0)))[body].mean()
    assert hp(f) < hp(lo) < hp(l20)
    # deterministic with the seed; another seed gives another patient
    man2 = generate_dataset(tmp_path / "b", 1, **dict(kw, tracers=("FDG",), n_test=0))
    f2 = sitk.GetArrayFromImage(sitk.ReadImage(str(man2.parent / r["full_dose"])))
    assert np.array_equal(f, f2)
    man3 = generate_dataset(tmp_path / "c", 1, **dict(kw, seed=12, tracers=("FDG",), n_test=0))
    f3 = sitk.GetArrayFromImage(sitk.ReadImage(str(man3.parent / r["full_dose"])))
    assert not np.array_equal(f, f3)
    # a case simulated again from its case.json: the same scan; noise-free: expected counts, same mean, no noise
    from ReconstructionModuleLib.simulate import reproduce_case
    case_dir = (d / r["full_dose"]).parent
    again = sitk.GetArrayFromImage(reproduce_case(case_dir)["images"]["full_dose"])
    assert np.abs(again - f).mean() < 1e-3 * f.mean()
    nf = reproduce_case(case_dir, noiseless=True)["images"]
    nfa = sitk.GetArrayFromImage(nf["full_dose"])
    nfl = sitk.GetArrayFromImage(nf["drf4"])
    assert abs(nfa.mean() / f.mean() - 1) < 0.02 and abs(nfl.mean() / nfa.mean() - 1) < 0.02
    # noise (distance from the noise-free image) grows ~ sqrt(DRF) = 2 from full to quarter dose
    assert np.abs(lo - nfa)[body].mean() > 1.5 * np.abs(f - nfa)[body].mean() > 0
    assert np.abs(nfl - nfa)[body].mean() < 0.5 * np.abs(f - nfa)[body].mean()
    with pytest.raises(InputError, match="case.json"):
        reproduce_case(tmp_path)


@pytest.mark.skipif(not _anatomy_available(), reason="shared example CT not available")
def test_lesions_have_their_suv_and_patients_differ():
    from ReconstructionModuleLib.simulate import CENTERS, load_body_anatomy, make_patient, truth_on_grid, center_grid
    an = load_body_anatomy()
    # ids as the generator names them: they share their first characters, the patients must still differ
    p1, p2 = make_patient(an, 0, "C1_p000"), make_patient(an, 0, "C1_p001")
    assert p1["lesions"] and p1["jitter"] != p2["jitter"]
    assert p1["field_seed"] != p2["field_seed"]
    assert p1["transform"].GetNthTransform(1).GetParameters() != p2["transform"].GetNthTransform(1).GetParameters()
    ref = center_grid(an, CENTERS["C1"], 0.6, max_slices=60)
    gt = truth_on_grid(an, p1, ref, "FDG")
    for L in p1["lesions"]:
        m = gt["lesions"] == L["index"]
        if m.any():
            assert np.allclose(gt["suv"][m], L["suv"]["FDG"])
    gt2 = truth_on_grid(an, p2, ref, "FDG")
    assert (gt["ldos"] != gt2["ldos"]).mean() > 0.01  # elastic deformation changes the anatomy
    assert len(set(np.unique(gt["ldos"])) - {0}) >= 5  # several organs of the anatomy on the grid
    with pytest.raises(InputError, match="tracer"):
        truth_on_grid(an, p1, ref, "PSMA")


def test_generator_rejects_bad_arguments(tmp_path):
    from ReconstructionModuleLib.simulate import generate_dataset
    with pytest.raises(InputError, match="centre"):
        generate_dataset(tmp_path, 1, centers=["C9"])
    with pytest.raises(InputError, match="tracer"):
        generate_dataset(tmp_path, 1, tracers=("PSMA",))
    with pytest.raises(InputError, match="DRF"):
        generate_dataset(tmp_path, 1, extra_drfs=(0.5,))


def test_sinogram_file_formats(tmp_path):
    from ReconstructionModuleLib.io import reconstruct_sinogram_file, save_sinogram
    img, _, _ = disc_phantom(n=24, nz=2)
    sysm = PETSystem(img.shape, (2.0, 2.0, 2.0))
    y = poisson_sample(sysm.forward(torch.from_numpy(img)) * 100, seed=0)
    f = save_sinogram(tmp_path / "s.npz", y.numpy(), (2.0, 2.0, 2.0), img.shape)
    res = reconstruct_sinogram_file(f, tmp_path / "r.nii.gz", n_iter=2, n_subsets=2)
    assert (tmp_path / "r.nii.gz").exists() and res["prompts"] > 0
    bad = tmp_path / "s.txt"
    bad.write_text("x")
    with pytest.raises(InputError, match="unknown sinogram file format"):
        reconstruct_sinogram_file(bad, tmp_path / "r2.nii.gz")


def test_cli_registers_commands():
    import argparse
    from ReconstructionModuleLib.cli import add_commands
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_commands(sub)
    for c in ("simulate", "reconstruct", "lowdose", "sr4zct", "listmode"):
        assert c in sub.choices
    a = p.parse_args(["simulate", "--out", "x", "--patients", "2", "--centers", "C1,C5"])
    assert callable(a.func) and a.patients == 2
