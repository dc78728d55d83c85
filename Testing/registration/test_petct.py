"""PET -> CT registration with the main job's settings: RegistrationModuleLib.petct and ``--preset pet-ct``."""

import argparse

import numpy as np
import pytest
import SimpleITK as sitk

from PETWorkbenchLib.errors import InputError
from RegistrationModuleLib import petct
from RegistrationModuleLib.cli import add_commands


def _pair(n=24, spacing=4.0):
    """A small CT (HU: air, fat, soft tissue, bone) and a PET of the same body (uptake, smooth)."""
    z, y, x = np.meshgrid(*[np.arange(n) for _ in range(3)], indexing="ij")
    r = np.hypot(y - n / 2, x - n / 2)
    ct = np.full((n, n, n), -1000.0)
    pet = np.zeros((n, n, n))
    ct[r < n / 2.5], pet[r < n / 2.5] = -100.0, 0.5
    inner = r < n / 3
    ct[inner], pet[inner] = 40.0, 1.0
    organ = inner & (np.hypot(y - n / 2, x - n / 2 - 2) < n / 6) & (z < n / 2)
    pet[organ] = 3.0
    ct[np.hypot(y - n * 0.75, x - n / 2) < 2] = 500.0

    def image(a):
        img = sitk.GetImageFromArray(a.astype(np.float32))
        img.SetSpacing((spacing,) * 3)
        return img
    return image(ct), sitk.SmoothingRecursiveGaussian(image(pet), 3.0)


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(argv)
    args.overwrite = False
    return args


def test_cli_preset_registers_with_the_main_jobs_settings(tmp_path):
    ct, pet = _pair()
    fp, mp, out = tmp_path / "ct.nii.gz", tmp_path / "pet.nii.gz", tmp_path / "u.nii.gz"
    sitk.WriteImage(ct, str(fp))
    sitk.WriteImage(pet, str(mp))
    args = _parse(["register", str(fp), str(mp), "-o", str(out), "--preset", "pet-ct", "--device", "cpu"])
    summary = args.func(args, None)
    assert summary["preset"] == "pet-ct"
    assert summary["similarity"] == petct.SETTINGS["similarity"] and summary["prealign"] == "none"
    assert summary["iterations"] == list(petct.SETTINGS["iterations"])
    assert summary["lncc_eps"] == petct.SETTINGS["lncc_eps"]
    u = sitk.ReadImage(str(out))
    assert u.GetSize() == ct.GetSize() and u.GetSpacing() == ct.GetSpacing()
    assert summary["folding_pct"] == 0 and summary["preset_settings"] == petct.fingerprint()


def test_swapped_images_and_masks_on_another_grid():
    ct, pet = _pair(12)
    with pytest.raises(InputError, match="does not look like a CT"):
        petct.register_pet_to_ct(pet, ct)
    body = np.zeros((12, 12, 12), np.uint8)
    body[2:10, 2:10, 2:10] = 1
    label = sitk.GetImageFromArray(body[::2, ::2, ::2].repeat(2, 0).repeat(2, 1).repeat(2, 2))
    label.CopyInformation(ct)
    coarse = sitk.GetImageFromArray(body[::2, ::2, ::2])        # the same region on a grid of twice the spacing
    coarse.SetSpacing((8.0, 8.0, 8.0))
    coarse.SetOrigin((2.0, 2.0, 2.0))
    a = petct.register_pet_to_ct(ct, pet, label, progress=None)
    b = petct.register_pet_to_ct(ct, pet, coarse)
    assert a.summary["preset"] == b.summary["preset"] == "pet-ct"


def test_cli_preset_refuses_options_it_sets_itself_and_writes_nothing(tmp_path):
    ct, pet = _pair(12)
    fp, mp = tmp_path / "ct.nii.gz", tmp_path / "pet.nii.gz"
    sitk.WriteImage(ct, str(fp))
    sitk.WriteImage(pet, str(mp))
    before = sorted(p.name for p in tmp_path.iterdir())
    args = _parse(["register", str(fp), str(mp), "-o", str(tmp_path / "u.nii.gz"), "--preset", "pet-ct",
                   "--similarity", "mind", "--iterations", "10,10", "--lncc-eps", "1e-5"])
    with pytest.raises(InputError, match="leave out --similarity, --iterations, --lncc-eps"):
        args.func(args, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_body_masks_are_named():
    ct, pet = _pair(12)
    with pytest.raises(InputError, match="shape"):
        petct.register_pet_to_ct(ct, pet, np.ones((3, 3, 3), bool))
    with pytest.raises(InputError, match="empty"):
        petct.register_pet_to_ct(ct, pet, np.zeros((12, 12, 12), bool))
    air = np.full((12, 12, 12), -1000.0, np.float32)
    air[6, 6, 6] = -600.0                      # not constant, but nothing above -500 HU: no body
    air_img = sitk.GetImageFromArray(air)
    air_img.CopyInformation(ct)
    with pytest.raises(InputError, match="body mask is empty"):
        petct.register_pet_to_ct(air_img, pet)


def test_fingerprint_follows_every_setting(monkeypatch):
    now = petct.fingerprint()
    assert now == petct.fingerprint() and now.startswith("pet-ct@")
    for name, value in (("SETTINGS", dict(petct.SETTINGS, smoothness=4.0)), ("CT_SIGMA_MM", 3.0),
                        ("CT_MAPPING", dict(petct.CT_MAPPING, bins=8))):
        monkeypatch.setattr(petct, name, value)
        assert petct.fingerprint() != now
        monkeypatch.undo()
    assert petct.fingerprint() == now


def test_cancel_after_the_mapping_stops_before_the_registration():
    from PETWorkbenchLib.errors import Cancelled
    ct, pet = _pair()
    asked, messages = [], []

    def cancel():
        asked.append(True)
        return len(asked) > 1                           # not at the start: after the CT mapping

    with pytest.raises(Cancelled):
        petct.register_pet_to_ct(ct, pet, progress=lambda f, m: messages.append(m), cancel=cancel)
    assert messages == ["mapping the CT to the PET's intensities"]
