"""A full disk while writing (simulated with RLIMIT_FSIZE in a child process, SIGXFSZ ignored, so that writes fail
with EFBIG exactly where the disk would have filled up): the previous file is left byte-identical, no temporary file
is left behind, the command ends with exit code 4 and one line, and a batch never marks such a study finished."""

import json

import pytest
import SimpleITK as sitk

from reliability_tools import (ERROR_PREFIX, error_lines, full_disk, pet_image, run, run_python, sha, snapshot,
                               temp_files, write_pet)

LIMIT = 4096          # bytes any file of the child may grow to: every output below is larger


# ----------------------------------------------------------------------------------------- imageio.write_image
_WRITE = """
import json
import SimpleITK as sitk
from PETWorkbenchLib.imageio import write_image
from PETWorkbenchLib.errors import PETWorkbenchError
img = sitk.ReadImage({new!r})
try:
    write_image(img, {target!r})
    print(json.dumps({{"type": None, "message": ""}}))
except PETWorkbenchError as e:
    print(json.dumps({{"type": type(e).__name__, "message": str(e)}}))
"""


@pytest.fixture(scope="module")
def write_image_results(tmp_path_factory):
    """{suffix: (folder, target, hash before, result dict, stderr)} of write_image onto an existing good file."""
    out = {}
    for suffix in (".nii", ".nii.gz", ".nrrd", ".mha"):
        d = tmp_path_factory.mktemp("wi" + suffix.replace(".", "_"))
        target = d / f"result{suffix}"
        sitk.WriteImage(pet_image(seed=0), str(target))                 # the good previous result
        new = write_pet(d / "new.nrrd", seed=1, shape=(20, 20, 20))    # what the failed run tried to write
        before = sha(target)
        p = run_python(_WRITE.format(new=str(new), target=str(target)), preexec_fn=full_disk(LIMIT), cwd=d)
        assert p.returncode == 0, p.stderr
        out[suffix] = (d, target, before, json.loads(p.stdout.strip().splitlines()[-1]), p.stderr)
    return out


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_write_image_on_full_disk_keeps_the_previous_file(write_image_results, suffix):
    d, target, before, result, _ = write_image_results[suffix]
    assert result["type"] == "ResourceError", result
    assert sha(target) == before
    assert temp_files(d) == []


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_write_image_on_full_disk_message_names_the_file_in_one_line(write_image_results, suffix):
    d, target, before, result, stderr = write_image_results[suffix]
    assert target.name in result["message"] and "\n" not in result["message"], result
    assert stderr.strip() == "", f"the image writer printed on stderr: {stderr!r}"


# ----------------------------------------------------------------------------------------- the command line
CASES = {
    "register-nii.gz": lambda d, out, m: ["--overwrite", "register", d / "fixed.nii.gz", d / "moving.nii.gz", "-o",
                                          out, "--iterations", "2,2,2", "--prealign", "none", "--device", "cpu"],
    "register-nii": lambda d, out, m: ["--overwrite", "register", d / "fixed.nii.gz", d / "moving.nii.gz", "-o", out,
                                       "--iterations", "2,2,2", "--prealign", "none", "--device", "cpu"],
    "segment-nii": lambda d, out, m: ["--overwrite", "segment", "--input", d / "fixed.nii.gz", "--output", out,
                                      "--model", m["segmentation"], "--device", "cpu"],
}
OUT_NAME = {"register-nii.gz": "field.nii.gz", "register-nii": "field.nii", "segment-nii": "labels.nii"}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, tiny_models):
    out = {}
    for case, argv in CASES.items():
        d = tmp_path_factory.mktemp(case.replace(".", "_"))
        write_pet(d / "fixed.nii.gz", seed=0)
        write_pet(d / "moving.nii.gz", seed=1)
        target = d / OUT_NAME[case]
        big = pet_image(seed=2, shape=(24, 24, 24))                    # a previous result, larger than LIMIT
        sitk.WriteImage(big, str(target))
        before = snapshot(d)
        p = run(argv(d, target, tiny_models), preexec_fn=full_disk(LIMIT), cwd=d)
        out[case] = (d, target, before, p)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_cli_output_on_full_disk_exits_4_and_keeps_the_previous_file(cli_results, case):
    d, target, before, p = cli_results[case]
    assert p.returncode == 4, (p.returncode, p.stderr)
    assert snapshot(d) == before                  # previous output and inputs byte-identical, nothing added
    assert temp_files(d) == []
    assert "Traceback" not in p.stderr
    assert error_lines(p.stderr)[-1].startswith(ERROR_PREFIX) and target.name in error_lines(p.stderr)[-1]


@pytest.mark.parametrize("case", list(CASES))
def test_cli_output_on_full_disk_reports_one_line(cli_results, case):
    d, target, before, p = cli_results[case]
    assert len(error_lines(p.stderr)) == 1, f"stderr is not one line: {p.stderr!r}"


# ----------------------------------------------------------------------------------------- batch
def test_batch_on_full_disk_marks_no_study_finished(tmp_path):
    write_pet(tmp_path / "low.nii.gz", seed=0)
    (tmp_path / "studies.csv").write_text("id,low_dose\ns1,low.nii.gz\n")
    inputs = snapshot(tmp_path)
    p = run(["batch", tmp_path / "studies.csv", "--out", tmp_path / "out", "--steps", "synthesize", "--device", "cpu"],
            preexec_fn=full_disk(LIMIT), cwd=tmp_path)
    assert p.returncode == 5, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    study = tmp_path / "out" / "s1"
    assert not (study / "DONE.json").exists()
    assert not (study / "synthesized.nii.gz").exists()
    failed = json.loads((study / "FAILED.json").read_text())
    assert failed["exit_code"] == 4 and "synthesized.nii.gz" in failed["error"]
    assert temp_files(tmp_path) == []
    assert {k: v for k, v in snapshot(tmp_path).items() if k in inputs} == inputs
