"""A fresh clone can build the standard simulated set: the anatomy ships with the extension, and the cache folder
is keyed on what the set is made from."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "ReconstructionModule"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from ReconstructionModuleLib import simulate


def test_anatomy_falls_back_to_the_shipped_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("PETWORKBENCH_SHARED_DATA", str(tmp_path))            # no shared data folder
    d = simulate.body_anatomy_dir()
    assert d == ROOT / "Resources" / "SampleData" / "TotalSegmentatorExampleCT"
    assert all((d / n).is_file() for n in ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz",
                                           "labels_total_v2.tsv"))


def test_the_cache_key_follows_the_generator_inputs(monkeypatch):
    key = simulate.standard_set_key()
    assert key == simulate.standard_set_key() and len(key) == 12
    assert simulate.standard_set_key(seed=1) != key
    monkeypatch.setitem(simulate.STANDARD_SET, "patients", 9)
    assert simulate.standard_set_key() != key


def test_an_existing_set_is_reused(tmp_path, monkeypatch):
    out = tmp_path / simulate.standard_set_key()
    out.mkdir()
    (out / "manifest.csv").write_text("case_id\n")
    (out / "dataset.json").write_text("{}")
    monkeypatch.setattr(simulate, "generate_standard_set", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert simulate.ensure_standard_set(tmp_path) == out / "manifest.csv"
