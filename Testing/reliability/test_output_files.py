"""Outputs never overwrite inputs (by name, by another spelling of the path, through a link), an existing output is
refused without --overwrite and replaced with it; and evaluation refuses images that are not on the same grid in
physical space, while the same labels stored in another axis order score as identical."""

import json
import os

import pytest
import SimpleITK as sitk

from reliability_tools import assert_one_error_line, cli, label_image, sha, write_pet


def test_synthesize_onto_its_own_input_is_refused(tmp_path, capfd, tiny_models):
    low = write_pet(tmp_path / "x.nii.gz")
    before = sha(low)
    os.symlink(low, tmp_path / "link.nii.gz")
    for out in (low, tmp_path / "." / "x.nii.gz", tmp_path / "link.nii.gz"):
        for extra in ([], ["--overwrite"]):
            code, _, err = cli(capfd, *extra, "synthesize", low, out, "--model", tiny_models["synthesis"])
            assert code == 2, (out, extra, err)
            assert "also an input" in assert_one_error_line(err)
            assert sha(low) == before


def test_routing_file_onto_the_output_or_input_is_refused(tmp_path, capfd, tiny_models):
    low = write_pet(tmp_path / "x.nii.gz")
    before = sha(low)
    for routing in (tmp_path / "out.nii.gz", low):
        code, _, err = cli(capfd, "synthesize", low, tmp_path / "out.nii.gz", "--routing-json", routing,
                           "--model", tiny_models["synthesis"])
        assert code == 2, err
        assert_one_error_line(err, routing.name)
    assert sha(low) == before and not (tmp_path / "out.nii.gz").exists()


def test_existing_output_needs_overwrite(tmp_path, capfd, tiny_models):
    low = write_pet(tmp_path / "low.nii.gz")
    out = tmp_path / "out.nii.gz"
    write_pet(out, seed=5)                                   # a previous, different result
    before = sha(out)
    code, _, err = cli(capfd, "synthesize", low, out, "--model", tiny_models["synthesis"], "--device", "cpu")
    assert code == 2
    assert "--overwrite" in assert_one_error_line(err, out.name)
    assert sha(out) == before
    code, _, err = cli(capfd, "synthesize", low, out, "--model", tiny_models["synthesis"], "--device", "cpu",
                       "--overwrite")                        # a global flag, accepted anywhere on the line
    assert code == 0, err
    assert sha(out) != before
    assert sitk.ReadImage(str(out)).GetSize() == (16, 16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["low.nii.gz", "out.nii.gz"]


def test_segment_and_evaluate_outputs_onto_inputs_are_refused(tmp_path, capfd, tiny_models):
    low = write_pet(tmp_path / "low.nii.gz")
    ref = tmp_path / "ref.nii.gz"
    sitk.WriteImage(label_image(), str(ref))
    before = {p: sha(p) for p in (low, ref)}
    code, _, err = cli(capfd, "--overwrite", "segment", "--input", low, "--output", low,
                       "--model", tiny_models["segmentation"])
    assert code == 2 and "also an input" in assert_one_error_line(err)
    code, _, err = cli(capfd, "--overwrite", "evaluate", "segmentation", "--pred", ref, "--ref", ref,
                       "--output", ref)
    assert code == 2 and "also an input" in assert_one_error_line(err)
    assert {p: sha(p) for p in before} == before


# ------------------------------------------------------------------------------------------------ grids
def test_evaluate_against_a_reference_shifted_40_mm_is_refused(tmp_path, capfd):
    ref = label_image()
    shifted = sitk.Image(ref)
    o = ref.GetOrigin()
    shifted.SetOrigin((o[0] + 40.0, o[1], o[2]))
    sitk.WriteImage(ref, str(tmp_path / "ref.nii.gz"))
    sitk.WriteImage(shifted, str(tmp_path / "pred.nii.gz"))
    code, _, err = cli(capfd, "evaluate", "segmentation", "--pred", tmp_path / "pred.nii.gz",
                       "--ref", tmp_path / "ref.nii.gz")
    assert code == 2, err
    assert "grid" in assert_one_error_line(err)


@pytest.mark.parametrize("reorder", ["flip-x", "flip-z", "permute"])
def test_same_labels_stored_in_another_axis_order_score_dice_1(tmp_path, capfd, reorder):
    ref = label_image()
    pred = {"flip-x": lambda: sitk.Flip(ref, [True, False, False]),
            "flip-z": lambda: sitk.Flip(ref, [False, False, True]),
            "permute": lambda: sitk.PermuteAxes(ref, [2, 0, 1])}[reorder]()
    assert sitk.GetArrayFromImage(pred).tobytes() != sitk.GetArrayFromImage(ref).tobytes()
    sitk.WriteImage(ref, str(tmp_path / "ref.nii.gz"))
    sitk.WriteImage(pred, str(tmp_path / "pred.nii.gz"))
    code, out, err = cli(capfd, "--json", "evaluate", "segmentation", "--pred", tmp_path / "pred.nii.gz",
                         "--ref", tmp_path / "ref.nii.gz")
    assert code == 0, err
    res = json.loads(out)
    assert res["mean"]["dice"] == pytest.approx(1.0)
    assert res["organs"]["liver"]["dice"] == pytest.approx(1.0)
