"""nnU-Net's largest-component post-processing: the rule, the decision on labelled cases, and its use by segment()."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PETWorkbenchLib.errors import InputError
from SegmentationModuleLib.postprocess import (apply_postprocessing, check_postprocessing, determine_postprocessing,
                                               keep_largest, largest_component)

torch.set_num_threads(1)


def test_largest_component_is_fully_connected_and_keeps_the_biggest():
    m = np.zeros((10, 10, 10), bool)
    m[1:4, 1:4, 1:4] = True            # 27 voxels
    m[4, 4, 4] = True                  # touches the cube at a corner only: same component with 26 neighbours
    m[7:9, 7:9, 7:9] = True            # 8 voxels, separate
    out = largest_component(m)
    assert out.sum() == 28 and out[4, 4, 4] and not out[7:9, 7:9, 7:9].any()
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()
    tie = np.zeros((10, 10, 10), bool)
    tie[0:2, 0:2, 0:2] = True
    tie[6:8, 6:8, 6:8] = True          # same size: both kept, as nnU-Net
    tie[4, 9, 0] = True
    out = largest_component(tie)
    assert out.sum() == 16 and not out[4, 9, 0]


def test_keep_largest_drops_islands_of_the_named_labels_only_and_leaves_the_input():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[1:5, 1:5, 1:5] = 1             # organ 1, main part
    lab[9:11, 9:11, 9:11] = 1          # organ 1, island
    lab[1:3, 8:11, 8:11] = 2           # organ 2, one part
    lab[8:10, 1:3, 1:3] = 2            # organ 2, second part (smaller)
    before = lab.copy()
    out = keep_largest(lab, [1])
    assert np.array_equal(lab, before)                              # input unchanged
    assert (out == 1).sum() == 64 and not (out[9:11, 9:11, 9:11] == 1).any()
    assert np.array_equal(out == 2, lab == 2)                       # other labels untouched
    both = keep_largest(lab, [1, 2])                                # the union's largest component: organ 1's cube
    assert set(np.unique(both)) == {0, 1} and (both == 1).sum() == 64


def _cases():
    """Organ 1: one true part, predicted with a far island (the rule helps). Organ 2: two true parts (like the
    kidneys), predicted exactly (the rule would delete one)."""
    preds, refs = [], []
    for shift in (0, 1, 2):
        ref = np.zeros((20, 20, 20), np.uint8)
        ref[2 + shift:8 + shift, 2:8, 2:8] = 1
        ref[12:15, 12:15, 2:5] = 2
        ref[12:14, 2:4, 12:14] = 2                    # the second part is smaller
        pred = ref.copy()
        pred[16:19, 16:19, 16:19] = 1                               # false island of organ 1
        preds.append(pred)
        refs.append(ref)
    return preds, refs


def test_determine_postprocessing_keeps_what_raises_dice_as_nnunet():
    preds, refs = _cases()
    decision, report = determine_postprocessing(preds, refs, [1, 2, 3])
    # the whole-foreground step would delete organ 2's parts (Dice down): refused; organ 1's rule: kept;
    # organ 2's rule removes a true part: refused; organ 3 is in no reference: not decided
    assert decision == {"largest_foreground": False, "largest_component": [1]}
    steps = {s["step"]: s for s in report["steps"]}
    assert not steps["largest_foreground"]["kept"]
    assert steps["largest_component 1"]["kept"] and steps["largest_component 1"]["dice_after"] == 1.0
    assert steps["largest_component 1"]["dice_before"] < 1.0
    assert not steps["largest_component 2"]["kept"] and steps["largest_component 2"]["dice_after"] < 1.0
    assert "largest_component 3" not in steps
    assert report["mean_dice_after"][1] == 1.0 and report["mean_dice_after"][2] == 1.0
    # applying the decision reproduces the reference exactly
    for p, r in zip(preds, refs):
        assert np.array_equal(apply_postprocessing(p, decision), r)


def test_determine_postprocessing_takes_the_foreground_step_when_nothing_gets_worse():
    preds, refs = _cases()
    for p, r in zip(preds, refs):       # organ 2 as one part: the whole-foreground rule only removes the island
        p[p == 2] = 0
        r[r == 2] = 0
        p[8:12, 2:8, 2:8] = 2          # touching organ 1
        r[8:12, 2:8, 2:8] = 2
    decision, report = determine_postprocessing(preds, refs, [1, 2])
    assert decision["largest_foreground"] is True
    assert report["steps"][0]["mean_dice_after"] > report["steps"][0]["mean_dice_before"]


def test_foreground_step_is_refused_when_one_organ_gets_worse_even_if_the_mean_rises():
    preds, refs = [], []
    for _ in range(2):
        ref = np.zeros((20, 20, 20), np.uint8)
        ref[2:10, 2:10, 2:10] = 1
        ref[10:12, 2:10, 2:10] = 2                    # organ 2 touches organ 1 ...
        ref[16:18, 16:18, 16:18] = 2                  # ... and has a small part of its own elsewhere
        pred = ref.copy()
        pred[2:10, 12:16, 2:10] = 1                   # big false island of organ 1
        preds.append(pred)
        refs.append(ref)
    decision, report = determine_postprocessing(preds, refs, [1, 2])
    fg = report["steps"][0]
    # organ 1: 0.8 -> 1.0, organ 2: 1.0 -> 0.97, so the mean rises, but an organ got worse: refused (nnU-Net)
    assert fg["mean_dice_after"] > fg["mean_dice_before"] and not fg["kept"]
    assert decision == {"largest_foreground": False, "largest_component": [1]}


def test_postprocessing_decision_is_validated():
    assert check_postprocessing(None) == {"largest_foreground": False, "largest_component": []}
    for bad in ({"largest_foreground": "yes"}, {"largest_component": [0]}, {"largest_component": [True]},
                {"largest_component": "1"}, {"other": 1}, [1]):
        with pytest.raises(InputError, match="post-processing"):
            check_postprocessing(bad)
    with pytest.raises(InputError, match="same number"):
        determine_postprocessing([], [], [1])
    with pytest.raises(InputError, match="differ in size"):
        determine_postprocessing([np.zeros((2, 2, 2))], [np.zeros((2, 3, 2))], [1])
    with pytest.raises(InputError, match="0-255"):
        determine_postprocessing([np.full((2, 2, 2), 300)], [np.zeros((2, 2, 2), int)], [1])
    with pytest.raises(InputError, match="0-255"):
        determine_postprocessing([np.zeros((2, 2, 2), np.float32)], [np.zeros((2, 2, 2), int)], [1])
    with pytest.raises(InputError, match="1-255"):
        determine_postprocessing([np.zeros((2, 2, 2), int)], [np.zeros((2, 2, 2), int)], [256])


def _tiny_model(postprocessing=None):
    from SegmentationModuleLib.model import build_network
    cfg = {"task": "segonly", "spacing": [4.0, 4.0, 4.0], "patch_size": [16, 16, 16], "norm": {"clip": 50, "scale": 5},
           "inference": {"overlap": 0.25, "sw_batch_size": 2},
           "network": {"in_channels": 1, "n_classes": 19, "features": [4, 8], "strides": [1, 2], "n_blocks": [1, 1],
                       "n_conv_decoder": 1, "denoise": False}}
    if postprocessing is not None:
        cfg["inference"]["postprocessing"] = postprocessing
    torch.manual_seed(0)
    return {"config": cfg, "state_dict": build_network(cfg).state_dict()}


def test_segment_applies_the_models_decision_and_can_skip_it(tmp_path):
    from PETWorkbenchApp.cli import main
    from SegmentationModuleLib import segment
    from SegmentationModuleLib.evaluate import with_postprocessing
    rng = np.random.default_rng(0)
    im = sitk.GetImageFromArray((rng.random((24, 24, 24)) * 4).astype(np.float32))
    im.SetSpacing((4.0, 4.0, 4.0))
    raw, _ = segment(im, _tiny_model(), device="cpu", allow_empty=True)
    raw = sitk.GetArrayFromImage(raw)
    labels = [int(v) for v in np.unique(raw) if v]
    # random weights on noise: organs in pieces, so the rule must change the map
    expected = apply_postprocessing(raw, {"largest_foreground": False, "largest_component": labels})
    assert not np.array_equal(expected, raw)
    pp = {"largest_foreground": False, "largest_component": labels}
    out, _ = segment(im, _tiny_model(pp), device="cpu", allow_empty=True)
    assert np.array_equal(sitk.GetArrayFromImage(out), expected)
    off, _ = segment(im, _tiny_model(pp), device="cpu", allow_empty=True, postprocess=False)
    assert np.array_equal(sitk.GetArrayFromImage(off), raw)
    # organs= selects from the post-processed map (the rule sees every organ, as when it was decided)
    one = labels[0]
    sub, _ = segment(im, _tiny_model(pp), organs=[one], device="cpu", allow_empty=True)
    assert np.array_equal(sitk.GetArrayFromImage(sub), np.where(expected == one, expected, 0))
    # an input grid other than the model's: the rule applies on the input grid
    im3 = sitk.Resample(im, [30, 30, 30], sitk.Transform(), sitk.sitkLinear, im.GetOrigin(), (3.2, 3.2, 3.2),
                        im.GetDirection(), 0.0, sitk.sitkFloat32)
    raw3 = sitk.GetArrayFromImage(segment(im3, _tiny_model(), device="cpu", allow_empty=True)[0])
    got3 = sitk.GetArrayFromImage(segment(im3, _tiny_model(pp), device="cpu", allow_empty=True)[0])
    assert got3.shape == raw3.shape == (30, 30, 30)
    assert np.array_equal(got3, apply_postprocessing(raw3, pp))
    # the decision written into a new weights file, which segment() then applies; the source file is not changed
    src = tmp_path / "model.pt"
    torch.save(_tiny_model(), src)
    stamp = src.read_bytes()
    with_postprocessing(src, pp, tmp_path / "model_pp.pt", inputs=[src])
    assert src.read_bytes() == stamp
    out2, _ = segment(im, tmp_path / "model_pp.pt", device="cpu", allow_empty=True)
    assert np.array_equal(sitk.GetArrayFromImage(out2), expected)
    with pytest.raises(InputError):
        with_postprocessing(src, pp, src, inputs=[src])
    # the CLI refuses to decide without a model and a manifest, in one line (exit 2)
    assert main(["evaluate", "segmentation", "--determine-postprocessing", "--model", str(src)]) == 2
    assert json.loads(json.dumps(check_postprocessing(pp))) == pp


def test_cli_decides_on_a_manifest_split_and_writes_a_new_model(tmp_path):
    import csv
    from PETWorkbenchApp.cli import main
    from SegmentationModuleLib import segment
    rng = np.random.default_rng(1)
    rows = []
    for i, split in enumerate(("train", "train", "test")):
        pet = sitk.GetImageFromArray((rng.random((20, 20, 20)) * 4).astype(np.float32))
        pet.SetSpacing((4.0, 4.0, 4.0))
        lab = np.zeros((20, 20, 20), np.uint8)
        lab[4:12, 4:12, 4:12] = 14
        ref = sitk.GetImageFromArray(lab)
        ref.CopyInformation(pet)
        sitk.WriteImage(pet, str(tmp_path / f"c{i}_pet.nii.gz"))
        sitk.WriteImage(ref, str(tmp_path / f"c{i}_lab.nii.gz"))
        rows.append({"case_id": f"c{i}", "patient_id": f"c{i}", "center": "A", "known": 1, "tracer": "FDG", "drf": 20,
                     "split": split, "full_dose": "", "low_dose": "", "low_dose_drf20": f"c{i}_pet.nii.gz", "ct": "",
                     "labels": f"c{i}_lab.nii.gz", "lesions": "", "spacing_mm": "4x4x4", "units": "SUV"})
    with open(tmp_path / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    src = tmp_path / "model.pt"
    torch.save(_tiny_model(), src)
    code = main(["evaluate", "segmentation", "--determine-postprocessing", "--model", str(src), "--manifest",
                 str(tmp_path / "manifest.csv"), "--split", "train", "--output", str(tmp_path / "pp.json"),
                 "--write-model", str(tmp_path / "pp.pt"), "--device", "cpu"])
    assert code == 0
    rep = json.loads((tmp_path / "pp.json").read_text())
    assert rep["cases"] == ["c0", "c1"] and rep["n_cases"] == 2 and rep["split"] == "train"
    decision = rep["decision"]
    assert set(decision) == {"largest_foreground", "largest_component"}
    steps = [st["step"] for st in rep["steps"]]
    assert steps[0] == "largest_foreground" and "largest_component 14" in steps   # the organ of the references
    assert "largest_component 1" not in steps                                       # in no reference: not decided
    # the written model carries the decision and segment() applies it
    pet = sitk.ReadImage(str(tmp_path / "c2_pet.nii.gz"))
    raw, _ = segment(pet, src, device="cpu", allow_empty=True)
    got, _ = segment(pet, tmp_path / "pp.pt", device="cpu", allow_empty=True)
    assert np.array_equal(sitk.GetArrayFromImage(got), apply_postprocessing(sitk.GetArrayFromImage(raw), decision))
    # refusing to overwrite an input, and an empty split, each in one line with exit code 2
    assert main(["evaluate", "segmentation", "--determine-postprocessing", "--model", str(src), "--manifest",
                 str(tmp_path / "manifest.csv"), "--split", "train", "--write-model", str(src)]) == 2
    assert main(["evaluate", "segmentation", "--determine-postprocessing", "--model", str(src), "--manifest",
                 str(tmp_path / "manifest.csv"), "--split", "val"]) == 2
    man = ["--model", str(src), "--manifest", str(tmp_path / "manifest.csv")]
    for argv in (["--determine-postprocessing"] + man,                       # no --split: never the test default
                 ["--determine-postprocessing", "--split", "test"] + man,    # deciding on the test cases
                 ["--determine-postprocessing", "--split", "train", "--denoiser", str(src)] + man,
                 ["--write-model", str(tmp_path / "x.pt")] + man,             # without --determine-postprocessing
                 ["--determine-postprocessing", "--split", "train", "--output", str(tmp_path / "pp.json")] + man):
        before = sorted(p.name for p in tmp_path.iterdir())
        assert main(["evaluate", "segmentation"] + argv) == 2, argv          # the last: the report exists
        assert sorted(p.name for p in tmp_path.iterdir()) == before
