"""Tests of RegistrationModuleLib (engine, regulariser, similarity, metrics, CLI). Tiny synthetic data."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "RegistrationModule"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from PETWorkbenchLib.errors import Cancelled, InputError
from RegistrationModuleLib import register
from RegistrationModuleLib import metrics, ops
from RegistrationModuleLib.regularizers import implicit_solve
from RegistrationModuleLib.result import RegistrationResult


# ------------------------------------------------------------------------------------------------ helpers
def blobs(shape, seed=0, n=None, sigma=1.5):
    """Textured test image: Gaussian-filtered white noise scaled to 0..1 (structure everywhere)."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return ((a - a.min()) / (a.max() - a.min())).astype(np.float32)


def make_image(arr, spacing=None, direction=None, origin=None):
    img = sitk.GetImageFromArray(arr)
    nd = arr.ndim
    img.SetSpacing(spacing or (1.0,) * nd)
    if direction is not None:
        img.SetDirection(direction)
    if origin is not None:
        img.SetOrigin(origin)
    return img


def smooth_field(ref, amp, sigma_frac=0.25, seed=0):
    """Smooth pull-back field (LPS mm, array (*spatial, nd)) on ref's grid: one Gaussian bump per component."""
    nd = ref.GetDimension()
    shape = sitk.GetArrayViewFromImage(ref).shape
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    u = np.zeros(shape + (nd,))
    for c in range(nd):
        ctr = rng.uniform(0.35, 0.65, nd)
        g = np.exp(-sum((gr - ci) ** 2 for gr, ci in zip(grids, ctr)) / (2 * sigma_frac ** 2))
        u[..., c] = amp * rng.choice([-1, 1]) * g
    return u


def warp_known(img, u):
    f = sitk.GetImageFromArray(u.astype(np.float64), isVector=True)
    f.CopyInformation(img)
    return sitk.Resample(img, img, sitk.DisplacementFieldTransform(f), sitk.sitkLinear, 0.0)


FAST = dict(iterations=(60, 40), prealign="none", device="cpu")


# ------------------------------------------------------------------------------------------------ regulariser
def test_implicit_solver_keeps_constants_and_damps_high_frequencies():
    rng = np.random.default_rng(0)
    const = torch.full((1, 2, 32, 32), 3.0)
    out = implicit_solve(const, 4.0, (1.0, 1.0), "diffusion")
    assert torch.allclose(out, const, atol=1e-4)
    noise = torch.from_numpy(rng.normal(size=(1, 2, 32, 32)).astype(np.float32))
    for kind in ("diffusion", "elastic", "curvature"):
        sm = implicit_solve(noise, 4.0, (1.0, 1.0), kind)
        assert sm.shape == noise.shape
        assert float(sm.std()) < 0.5 * float(noise.std()), kind
    # larger gamma -> smoother
    a = implicit_solve(noise, 1.0, (1.0, 1.0), "diffusion")
    b = implicit_solve(noise, 10.0, (1.0, 1.0), "diffusion")
    assert float(b.std()) < float(a.std())


def test_implicit_solver_satisfies_its_equation_in_the_interior():
    # (I - gamma * Laplacian) ubar = u at interior points (periodic solve after mirror padding)
    rng = np.random.default_rng(1)
    u = torch.from_numpy(rng.normal(size=(1, 1, 40, 40)).astype(np.float32))
    u = ops.gaussian_blur(u, [1.5, 1.5])
    gamma = 2.0
    ub = implicit_solve(u.expand(1, 2, 40, 40).contiguous(), gamma, (1.0, 1.0), "diffusion")[:, :1]
    lap = (ub[..., 2:, 1:-1] + ub[..., :-2, 1:-1] + ub[..., 1:-1, 2:] + ub[..., 1:-1, :-2] - 4 * ub[..., 1:-1, 1:-1])
    resid = ub[..., 1:-1, 1:-1] - gamma * lap - u[..., 1:-1, 1:-1]
    inner = resid[..., 8:-8, 8:-8]
    assert float(inner.abs().max()) < 0.05 * float(u.abs().max())


def _smooth_field_2d(n=48, seed=2, sigma=3.0):
    rng = np.random.default_rng(seed)
    u = torch.from_numpy(rng.normal(size=(1, 2, n, n)).astype(np.float32))
    return ops.gaussian_blur(u, [sigma, sigma]) * 10.0


def _lap5(a):
    """5-point Laplacian of (..., H, W) at the interior points."""
    return a[..., 2:, 1:-1] + a[..., :-2, 1:-1] + a[..., 1:-1, 2:] + a[..., 1:-1, :-2] - 4 * a[..., 1:-1, 1:-1]


def test_curvature_solver_satisfies_its_equation_in_the_interior():
    # (I + gamma * Laplacian^2) ubar = u at interior points
    u = _smooth_field_2d()
    gamma = 3.0
    ub = implicit_solve(u, gamma, (1.0, 1.0), "curvature")
    bil = _lap5(_lap5(ub))                                      # interior shrinks by 2 on each side
    resid = ub[..., 2:-2, 2:-2] + gamma * bil - u[..., 2:-2, 2:-2]
    inner = resid[..., 8:-8, 8:-8]
    assert float(inner.abs().max()) < 0.02 * float(u.abs().max())
    # the diffusion solution does not satisfy the curvature equation (the test tells the operators apart)
    ud = implicit_solve(u, gamma, (1.0, 1.0), "diffusion")
    rd = (ud[..., 2:-2, 2:-2] + gamma * _lap5(_lap5(ud)) - u[..., 2:-2, 2:-2])[..., 8:-8, 8:-8]
    assert float(rd.abs().max()) > 5 * float(inner.abs().max())


def test_implicit_solves_are_contractions():
    # |eigenvalues| of u -> ubar at most 1 (power iteration): otherwise the penalty |u - ubar|^2 lets u grow
    torch.manual_seed(0)
    for kind in ("curvature", "diffusion"):
        u = torch.randn(1, 2, 32, 28)
        for _ in range(150):
            v = implicit_solve(u, 500.0, (2.0, 2.0), kind)
            ratio = float(v.norm() / u.norm())
            u = v / v.norm()
        assert ratio <= 1.0 + 1e-4, (kind, ratio)


def test_elastic_solver_satisfies_the_navier_lame_equation_in_the_interior():
    # (I + gamma * L) ubar = u with L u = -mu Laplacian u - (mu + lambda) grad div u (mu = 1, lambda = 0),
    # derivatives by finite differences on a smooth field (channel 0 = x = last array axis, 1 = y)
    u = _smooth_field_2d(seed=3)
    gamma = 3.0

    def residual(ub):
        a = ub[0].double().numpy()
        div = np.gradient(a[0], axis=1) + np.gradient(a[1], axis=0)
        gdiv = np.stack([np.gradient(div, axis=1), np.gradient(div, axis=0)])
        lap = _lap5(torch.from_numpy(a)).numpy()
        Lu = -lap - gdiv[:, 1:-1, 1:-1]
        r = a[:, 1:-1, 1:-1] + gamma * Lu - u[0, :, 1:-1, 1:-1].double().numpy()
        return np.abs(r[:, 8:-8, 8:-8]).max()

    r_el = residual(implicit_solve(u, gamma, (1.0, 1.0), "elastic"))
    assert r_el < 0.03 * float(u.abs().max())
    assert residual(implicit_solve(u, gamma, (1.0, 1.0), "diffusion")) > 5 * r_el


def test_scaling_and_squaring_gives_an_invertible_field():
    # a velocity large enough that, used as a displacement, it folds; its exponential does not, and
    # exp(v) composed with exp(-v) is the identity up to interpolation
    n = 64
    y, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    g = np.exp(-((x - 32) ** 2 + (y - 32) ** 2) / (2 * 8.0 ** 2))
    v = torch.from_numpy(np.stack([18.0 * g, 6.0 * g])[None].astype(np.float32))   # pushes along +x: compresses
    extent = (n - 1.0, n - 1.0)
    assert float(ops.jacobian_determinant(v, (1.0, 1.0)).min()) <= 0      # the plain displacement folds
    a = ops.compose_exp(v, extent)
    b = ops.compose_exp(-v, extent)
    assert float(ops.jacobian_determinant(a, (1.0, 1.0)).min()) > 0
    assert float(ops.jacobian_determinant(b, (1.0, 1.0)).min()) > 0
    ident = a + ops.warp(b, a, extent)                             # x -> x + a(x) -> (x + a) + b(x + a)
    assert float(a.abs().max()) > 5.0
    assert float(ident[..., 8:-8, 8:-8].abs().max()) < 0.05 * float(a.abs().max())


def test_elastic_penalises_compression_more_than_diffusion():
    # curl-free field (gradient of a potential): elastic (mu=1, lambda=0) adds the grad-div term -> smoother;
    # divergence-free field: elastic equals diffusion
    n = 48
    y, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    phi = np.sin(2 * np.pi * 3 * x / n) * np.sin(2 * np.pi * 3 * y / n)
    gy, gx = np.gradient(phi)
    curl_free = torch.from_numpy(np.stack([gx, gy])[None].astype(np.float32))
    div_free = torch.from_numpy(np.stack([-gy, gx])[None].astype(np.float32))
    sd, se = (implicit_solve(curl_free, 3.0, (1.0, 1.0), k) for k in ("diffusion", "elastic"))
    assert float(se.norm()) < 0.8 * float(sd.norm())
    dd, de = (implicit_solve(div_free, 3.0, (1.0, 1.0), k) for k in ("diffusion", "elastic"))
    assert abs(float(de.norm()) - float(dd.norm())) < 0.1 * float(dd.norm())


# ------------------------------------------------------------------------------------------------ engine
def test_recovers_known_smooth_deformation_2d_without_folding():
    fixed0 = make_image(blobs((64, 64), seed=1), spacing=(1.5, 1.5))
    u_true = smooth_field(fixed0, amp=4.0)
    moving = fixed0
    fixed = warp_known(fixed0, u_true)          # fixed(x) = moving(x + u_true(x))
    res = register(fixed, moving, **FAST)
    u = sitk.GetArrayFromImage(res.displacement)
    mag = np.linalg.norm(u_true, axis=-1)
    roi = mag > 1.0
    err = np.linalg.norm(u - u_true, axis=-1)[roi].mean()
    assert err < 0.35 * mag[roi].mean(), (err, mag[roi].mean())
    assert res.summary["folding_pct"] == 0.0
    # the warped moving image matches the fixed one much better than before
    before = np.abs(sitk.GetArrayFromImage(fixed) - sitk.GetArrayFromImage(moving)).mean()
    after = np.abs(sitk.GetArrayFromImage(fixed) - sitk.GetArrayFromImage(res.warp(moving))).mean()
    assert after < 0.5 * before


def test_displacement_convention_lps_with_oblique_direction():
    # moving(x) = fixed(x - t)  =>  x_moving = x_fixed + t  =>  u == t (LPS mm) whatever the grid orientation
    a = math.radians(30)
    direction = (math.cos(a), -math.sin(a), math.sin(a), math.cos(a))
    arr = blobs((48, 48), seed=2)
    fixed = make_image(arr, spacing=(2.0, 1.5), direction=direction, origin=(10.0, -5.0))
    t = np.array([3.0, -2.0])
    tx = sitk.TranslationTransform(2, (-t).tolist())     # resampling transform: moving(x) = fixed(x - t)
    moving = sitk.Resample(fixed, fixed, tx, sitk.sitkLinear, 0.0)
    res = register(fixed, moving, regularizer="diffusion", smoothness=4.0, **FAST)
    u = sitk.GetArrayFromImage(res.displacement)
    inner = u[12:-12, 12:-12].reshape(-1, 2)
    assert np.allclose(np.median(inner, axis=0), t, atol=0.5), np.median(inner, axis=0)
    # transform_points agrees with x + u(x)
    p = np.array(fixed.TransformContinuousIndexToPhysicalPoint((24.0, 24.0)))
    q = res.transform_points([p])[0]
    assert np.allclose(q - p, u[24, 24], atol=1e-6)


def test_3d_pair_improves_similarity_and_warp_matches_sitk_resampling():
    fixed0 = make_image(blobs((24, 28, 26), seed=3), spacing=(2.0, 2.0, 3.0))
    u_true = smooth_field(fixed0, amp=4.0, sigma_frac=0.3, seed=4)
    fixed = warp_known(fixed0, u_true)
    res = register(fixed, fixed0, iterations=(40, 20), prealign="none", device="cpu")
    u = sitk.GetArrayFromImage(res.displacement)
    assert u.shape == (24, 28, 26, 3)
    mag = np.linalg.norm(u_true, axis=-1)
    roi = mag > 1.0
    assert np.linalg.norm(u - u_true, axis=-1)[roi].mean() < 0.5 * mag[roi].mean()
    w = res.warp(fixed0)
    ref = sitk.Resample(fixed0, fixed, sitk.DisplacementFieldTransform(sitk.Image(res.displacement)),
                        sitk.sitkLinear, float(sitk.GetArrayViewFromImage(fixed0).min()))
    assert np.allclose(sitk.GetArrayFromImage(w), sitk.GetArrayFromImage(ref))
    assert res.jacobian_determinant().GetSize() == fixed.GetSize()


def test_affine_prealignment_recovers_a_large_shift():
    arr = blobs((96, 96), seed=5, sigma=4.0)
    fixed = make_image(arr)
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(2, (-9.0, 6.0)), sitk.sitkLinear, 0.0)
    res = register(fixed, moving, iterations=(10,), prealign="rigid", device="cpu")
    u = sitk.GetArrayFromImage(res.displacement)
    assert np.allclose(np.median(u[24:-24, 24:-24].reshape(-1, 2), 0), [9.0, -6.0], atol=1.0)
    assert np.allclose(res.affine.GetTranslation(), [9.0, -6.0], atol=1.0)


def test_diffeomorphic_mode_has_no_folding_where_plain_mode_folds():
    fixed0 = make_image(blobs((64, 64), seed=6))
    u_true = smooth_field(fixed0, amp=7.0, sigma_frac=0.12, seed=7)
    fixed = warp_known(fixed0, u_true)
    kw = dict(iterations=(80, 60), prealign="none", device="cpu", regularizer="diffusion", smoothness=0.2,
              learning_rate=1.0)
    plain = register(fixed, fixed0, **kw)
    diffeo = register(fixed, fixed0, diffeomorphic=True, **kw)
    assert plain.summary["folding_pct"] > 0          # weak regularisation: the plain field folds
    assert diffeo.summary["folding_pct"] == 0.0
    assert diffeo.summary["jacobian_min"] > 0


def test_mind_handles_a_non_monotonic_intensity_mapping():
    arr = blobs((64, 64), seed=8)
    fixed0 = make_image(arr)
    u_true = smooth_field(fixed0, amp=3.0, sigma_frac=0.3, seed=9)
    fixed = warp_known(fixed0, u_true)
    a = arr / arr.max()
    moving = make_image((np.sin(3.0 * a) * (1.2 - a)).astype(np.float32))   # another "modality"
    res = register(fixed, moving, similarity="mind", regularizer="diffusion", smoothness=2.0, **FAST)
    u = sitk.GetArrayFromImage(res.displacement)
    roi = np.linalg.norm(u_true, axis=-1) > 1.0
    err0 = np.linalg.norm(u_true, axis=-1)[roi].mean()
    err = np.linalg.norm(u - u_true, axis=-1)[roi].mean()
    assert err < 0.6 * err0


def test_label_driven_mode_raises_dice():
    lab = np.zeros((64, 64), np.uint8)
    lab[20:44, 16:30] = 1
    lab[18:40, 34:50] = 2
    fl = make_image(lab)
    u_true = smooth_field(fl, amp=4.0, sigma_frac=0.3, seed=10)
    f = sitk.Resample(fl, fl, sitk.DisplacementFieldTransform(
        _vec(u_true, fl)), sitk.sitkNearestNeighbor, 0)
    img_f = sitk.Cast(f, sitk.sitkFloat32)
    img_m = sitk.Cast(fl, sitk.sitkFloat32)
    _, before = metrics.dice(f, fl)
    res = register(img_f, img_m, similarity="dice", fixed_labels=f, moving_labels=fl, **FAST)
    _, after = metrics.dice(f, res.warp(fl, is_label=True))
    assert after > before + 0.05 and after > 0.9


def _vec(u, ref):
    img = sitk.GetImageFromArray(u.astype(np.float64), isVector=True)
    img.CopyInformation(ref)
    return img


def test_fixed_mask_restricts_the_similarity():
    arr = blobs((64, 64), seed=11)
    fixed0 = make_image(arr)
    u_true = smooth_field(fixed0, amp=4.0, sigma_frac=0.3, seed=12)
    fixed = warp_known(fixed0, u_true)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :20] = 1          # only the left part counts
    res = register(fixed, fixed0, fixed_mask=make_image(mask), regularizer="diffusion", smoothness=1.0, **FAST)
    full = register(fixed, fixed0, regularizer="diffusion", smoothness=1.0, **FAST)
    u, uf = sitk.GetArrayFromImage(res.displacement), sitk.GetArrayFromImage(full.displacement)
    right = np.s_[:, 44:]
    e_mask = np.linalg.norm(u[right] - u_true[right], axis=-1).mean()
    e_full = np.linalg.norm(uf[right] - u_true[right], axis=-1).mean()
    assert e_full < e_mask     # outside the mask the masked run has no image information


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_get_clear_messages():
    f2 = make_image(blobs((32, 32)))
    f3 = make_image(blobs((16, 16, 16)))
    with pytest.raises(InputError, match="2D.*3D|3D.*2D"):
        register(f2, f3)
    far = make_image(blobs((32, 32)), origin=(1000.0, 1000.0))
    with pytest.raises(InputError, match="do not overlap"):
        register(f2, far)
    empty = make_image(np.zeros((32, 32), np.uint8))
    with pytest.raises(InputError, match="mask is empty"):
        register(f2, f2, fixed_mask=empty)
    with pytest.raises(InputError, match="similarity"):
        register(f2, f2, similarity="magic")
    rgb = sitk.Compose([f2, f2, f2])
    with pytest.raises(InputError, match="scalar"):
        register(rgb, f2)
    with pytest.raises(InputError, match="constant"):
        register(f2, make_image(np.ones((32, 32), np.float32)))
    with pytest.raises(InputError, match="smoothness"):
        register(f2, f2, smoothness=-1)
    nan = blobs((32, 32))
    nan[5, 7] = np.nan
    with pytest.raises(InputError, match="moving image contains NaN"):
        register(f2, make_image(nan))
    with pytest.raises(InputError, match="moving mask is empty"):
        register(f2, f2, moving_mask=empty)


def test_cli_refuses_bad_input_and_leaves_the_files_alone(tmp_path):
    import argparse
    from RegistrationModuleLib.cli import add_commands
    f2, f3 = tmp_path / "f2.nii.gz", tmp_path / "f3.nii.gz"
    sitk.WriteImage(make_image(blobs((32, 32))), str(f2))
    sitk.WriteImage(make_image(blobs((16, 16, 16))), str(f3))
    out = tmp_path / "u.nii.gz"
    out.write_bytes(b"an older result")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["register", str(f2), str(f3), "--output", str(tmp_path / "new.nii.gz"),
                              "--warped", str(out)])
    args.overwrite = True                      # the global --overwrite of the petworkbench command
    with pytest.raises(InputError, match="2D.*3D"):
        args.func(args, None)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_progress_and_cancel():
    f = make_image(blobs((32, 32)))
    seen = []
    register(f, f, iterations=(10, 10), prealign="none", device="cpu", progress=lambda x, m: seen.append(x))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and all(0 <= s <= 1 for s in seen)
    assert all(b >= a for a, b in zip(seen, seen[1:]))
    with pytest.raises(Cancelled):
        register(f, f, iterations=(10, 10), prealign="none", device="cpu", cancel=lambda: True)


# ------------------------------------------------------------------------------------------------ metrics
def test_jacobian_of_a_linear_field():
    img = make_image(np.zeros((10, 12, 14), np.float32), spacing=(2.0, 1.0, 3.0))
    shape = (10, 12, 14)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")[::-1], -1).astype(float)
    x = idx * np.array([2.0, 1.0, 3.0])
    u = 0.1 * x                             # x -> 1.1 x  => J = 1.1^3
    res = RegistrationResult(_vec(u, img))
    J = sitk.GetArrayFromImage(res.jacobian_determinant())
    assert np.allclose(J, 1.1 ** 3, atol=1e-4)
    fold = -2.0 * x                         # x -> -x => J = -1 everywhere
    st = metrics.folding(_vec(fold, img))
    assert st["folding_pct"] == 100.0


def test_dice_hd95_tre():
    a = np.zeros((40, 40), np.uint8)
    a[10:30, 10:30] = 1
    b = np.roll(a, 3, axis=1)
    per, mean = metrics.dice(make_image(a), make_image(a))
    assert mean == 1.0
    _, m2 = metrics.dice(make_image(a), make_image(b))
    assert abs(m2 - 2 * 17 * 20 / 800) < 1e-9
    _, h = metrics.hd95(make_image(a, spacing=(2.0, 1.0)), make_image(b, spacing=(2.0, 1.0)))
    assert abs(h - 6.0) < 1e-6          # 3 voxels of 2 mm along x
    ref = make_image(np.zeros((20, 20), np.float32))
    u = np.zeros((20, 20, 2))
    u[..., 0] = 2.0
    errs, mean = metrics.tre(_vec(u, ref), [[5.0, 5.0], [10.0, 3.0]], [[7.0, 5.0], [12.0, 6.0]])
    assert np.allclose(errs, [0.0, 3.0])
    with pytest.raises(InputError):
        metrics.tre(_vec(u, ref), [[1.0, 2.0]], [[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(InputError, match="empty"):
        metrics.dice(make_image(np.zeros((5, 5), np.uint8)), make_image(np.zeros((5, 5), np.uint8)))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_register_writes_outputs(tmp_path):
    import argparse
    from RegistrationModuleLib.cli import add_commands
    fixed0 = make_image(blobs((48, 48), seed=13))
    fixed = warp_known(fixed0, smooth_field(fixed0, amp=3.0, seed=14))
    fp, mp = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    sitk.WriteImage(fixed, str(fp))
    sitk.WriteImage(fixed0, str(mp))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["register", str(fp), str(mp), "--output", str(tmp_path / "u.nii.gz"),
                              "--warped", str(tmp_path / "w.nii.gz"), "--jacobian", str(tmp_path / "j.nii.gz"),
                              "--iterations", "20,10", "--prealign", "none", "--device", "cpu"])
    summary = args.func(args, None)
    json.dumps(summary)
    u = sitk.ReadImage(str(tmp_path / "u.nii.gz"))
    assert u.GetNumberOfComponentsPerPixel() == 2 and u.GetSize() == fixed.GetSize()
    assert (tmp_path / "w.nii.gz").exists() and (tmp_path / "j.nii.gz").exists()
    assert "folding_pct" in summary


# ------------------------------------------------------------------------------------------------ TM-DCA
TINY = {"img_size": [16, 16, 16], "patch_size": 4, "embed_dim": 8, "depths": [2, 2], "num_heads": [2, 2],
        "window_size": [2, 2, 2], "offset_kernels": [3, 3], "mlp_ratio": 2.0, "reg_head_chan": 4}


def test_dca_network_shapes_identity_start_and_offsets_move_queries():
    from RegistrationModuleLib import dca
    torch.manual_seed(0)
    net = dca.TMDCA(TINY)
    m = torch.rand(1, 1, 16, 16, 16)
    f = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        flow = net(m, f)
    assert flow.shape == (1, 3, 16, 16, 16)
    assert float(flow.abs().max()) < 1e-2          # head initialised N(0, 1e-5): starts near identity
    # the deformable cross-attention depends on the reference path through the sampled queries
    blk = net.stages[0][0].attn_a
    xb, xr = torch.rand(1, 4, 4, 4, 8), torch.rand(1, 4, 4, 4, 8)
    with torch.no_grad():
        out1 = blk(xb, xr, shift=False)
        blk.offset.pw.bias.fill_(0.5)              # non-zero offsets -> different query positions
        out2 = blk(xb, xr, shift=False)
    assert out1.shape == (1, 4, 4, 4, 8) and not torch.allclose(out1, out2)
    with pytest.raises(ValueError, match="window"):
        dca.TMDCA(dict(TINY, img_size=[20, 16, 16]))


def test_dca_unsupervised_training_lowers_the_loss(tmp_path):
    from RegistrationModuleLib import dca
    torch.manual_seed(0)
    base = torch.from_numpy(blobs((16, 16, 16), seed=20, sigma=2.0))[None, None]
    shifted = torch.roll(base, 1, dims=4)

    def sampler():
        return shifted, base

    ck = tmp_path / "dca.pt"
    logs = []
    dca.train(sampler, TINY, steps=10, lr=3e-3, device="cpu", checkpoint=str(ck), log=logs.append,
                    save_every=10)
    first = float(logs[0].split("ncc ")[1].split()[0])
    last = float(logs[-1].split("ncc ")[1].split()[0])
    assert last < first
    loaded = dca.load(str(ck))
    field = dca.predict_field(loaded, base[0, 0].numpy(), shifted[0, 0].numpy(), (2.0, 2.0, 2.0))
    assert field.shape == (3, 16, 16, 16)
    # end to end: network prediction + instance-optimisation refinement through the engine
    f, m = make_image(base[0, 0].numpy()), make_image(shifted[0, 0].numpy())
    res = register(f, m, method="dca", model=str(ck), iterations=(5,), prealign="none", device="cpu")
    assert res.displacement.GetSize() == (16, 16, 16) and res.summary["method"] == "dca"
    assert res.summary["timings"]["network_s"] > 0


def test_dca_without_weights_is_a_model_error():
    from PETWorkbenchLib.errors import ModelError
    f = make_image(blobs((16, 16, 16)))
    with pytest.raises(ModelError, match="weights"):
        register(f, f, method="dca", prealign="none", device="cpu")


# ------------------------------------------------------------------------------------------------ Slicer bridge
def test_engine_field_through_slicer_grid_transform(mrml):
    """A point moved by the engine's field and by Slicer's transform of the output node land at the same place,
    and resampling the moving image through the node's transform reproduces ``res.warp``."""
    from PETWorkbenchSlicer import mrml as bridge
    a = math.radians(20)
    direction = (math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0, 0.0, 0.0, 1.0)
    fixed0 = make_image(blobs((16, 20, 18), seed=30), spacing=(2.0, 2.5, 3.0), direction=direction,
                        origin=(5.0, -7.0, 11.0))
    fixed = warp_known(fixed0, smooth_field(fixed0, amp=3.0, sigma_frac=0.3, seed=31))
    res = register(fixed, fixed0, iterations=(20, 10), prealign="none", device="cpu")
    fnode = bridge.image_to_volume(fixed, name="fixed")
    mnode = bridge.image_to_volume(fixed0, name="moving")
    node = bridge.displacement_to_transform(res.displacement, name="reg", fixedNode=fnode, movingNode=mnode)
    u = sitk.GetArrayFromImage(res.displacement)
    for idx in [(3, 4, 5), (10, 12, 8), (15, 2, 13)]:
        x_f = np.array(fixed.TransformIndexToPhysicalPoint(idx))
        engine = res.transform_points([x_f])[0]
        assert np.allclose(engine, x_f + u[idx[2], idx[1], idx[0]], atol=1e-6)
        ras = bridge.transform_points_ras(node, (x_f * [-1, -1, 1])[None])[0]
        assert np.allclose(ras * [-1, -1, 1], engine, atol=1e-3)
    back = bridge.transform_to_displacement(node, fixed)
    via_node = sitk.Resample(fixed0, fixed, sitk.DisplacementFieldTransform(sitk.Cast(back, sitk.sitkVectorFloat64)),
                             sitk.sitkLinear, float(sitk.GetArrayViewFromImage(fixed0).min()))
    assert np.allclose(sitk.GetArrayFromImage(via_node), sitk.GetArrayFromImage(res.warp(fixed0)), atol=1e-3)


def test_defaults_follow_the_similarity_term():
    f = make_image(blobs((24, 24), seed=20))
    lncc = register(f, f, iterations=(2,), prealign="none", device="cpu").summary
    mind = register(f, f, similarity="mind", iterations=(2,), prealign="none", device="cpu").summary
    assert (lncc["regularizer"], lncc["smoothness"], lncc["penalty"]) == ("curvature", 64.0, 1.5)
    assert (mind["regularizer"], mind["smoothness"], mind["penalty"]) == ("diffusion", 1.0, 1.0)
    own = register(f, f, regularizer="elastic", smoothness=3.0, penalty=2.0, iterations=(2,), prealign="none",
                   device="cpu")
    assert (own.summary["regularizer"], own.summary["smoothness"], own.summary["penalty"]) == ("elastic", 3.0, 2.0)
    with pytest.raises(InputError, match="penalty"):
        register(f, f, penalty=0.0, iterations=(2,), prealign="none", device="cpu")
    from RegistrationModuleLib.similarity import LNCC_EPS
    assert lncc["lncc_eps"] == LNCC_EPS and mind["lncc_eps"] is None
    for bad in (0.0, -1e-7, float("nan")):
        with pytest.raises(InputError, match="lncc_eps"):
            register(f, f, lncc_eps=bad, iterations=(2,), prealign="none", device="cpu")
    with pytest.raises(InputError, match="lncc similarity only"):
        register(f, f, similarity="mind", lncc_eps=1e-5, iterations=(2,), prealign="none", device="cpu")
    # the value reaches the similarity: a different stabiliser gives a different similarity before registration
    g = make_image(blobs((24, 24), seed=21))
    before = [register(f, g, lncc_eps=eps, iterations=(1,), prealign="none", device="cpu").summary["similarity_before"]
              for eps in (None, 1e-2)]
    assert before[0] != before[1]


def test_default_schedules_agree():
    import inspect

    from RegistrationModuleLib import infer, instance
    from RegistrationModuleLib.cli import RegisterRequest
    default = inspect.signature(infer.register).parameters["iterations"].default
    assert tuple(default) == tuple(inspect.signature(instance.optimise).parameters["iterations"].default)
    assert tuple(default) == tuple(RegisterRequest(fixed="", moving="", output="").iterations)


def test_lncc_sees_low_contrast_structure():
    """LNCC's stabiliser floors the product of the local variances: with the default, a texture whose standard
    deviation is 5 % of the intensity range (4 % within the 7-voxel window; soft-tissue contrast on a CT scaled to
    0..1) still correlates with itself and not with another texture; VoxelMorph's 1e-5 flattens it."""
    from RegistrationModuleLib.similarity import lncc
    a = torch.from_numpy(blobs((40, 40), seed=1))[None, None]
    b = torch.from_numpy(blobs((40, 40), seed=2))[None, None]
    a, b = 0.5 + 0.05 * (a - a.mean()) / a.std(), 0.5 + 0.05 * (b - b.mean()) / b.std()
    assert float(lncc(a, a)) < -0.85 and float(lncc(a, b)) > -0.3 and float(lncc(a, a)) < float(lncc(a, b)) - 0.5
    assert float(lncc(a, a, eps=1e-5)) > -0.3
