"""Resources/SampleData/SampleData.json: Slicer IO file types, files that exist with the stated SHA-256, files that
slicer-core's readers for those types load, and registration through Slicer's real SampleData module."""

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = json.loads((ROOT / "Resources" / "SampleData" / "SampleData.json").read_text())
FILES = [f for src in SPEC["sources"] for f in src["files"]]
SAMPLE_DATA_PY = ROOT.parent / "shared" / "slicer-python" / "SampleData" / "SampleData.py"

# File type names of Slicer's IO manager (qSlicerIO::IOFileType) as slicer.util.load*/SampleData pass them to
# coreIOManager().loadNodes(); "ZipFile" is SampleData's own (download and extract).
SLICER_IO_FILE_TYPES = {"VolumeFile", "SegmentationFile", "TransformFile", "SceneFile", "ModelFile", "MarkupsFile",
                        "TableFile", "ColorTableFile", "TextFile", "SequenceFile", "FiberBundleFile",
                        "ScalarOverlayFile", "ShaderPropertyFile", "AnnotationFile", "ZipFile"}


def test_every_load_type_is_a_slicer_io_file_type():
    for f in FILES:
        assert f["loadType"] in SLICER_IO_FILE_TYPES, f"{f['file']}: loadType {f['loadType']!r} is not a Slicer IO " \
                                                       f"file type ({', '.join(sorted(SLICER_IO_FILE_TYPES))})"


def test_load_types_are_the_names_slicers_own_python_uses():
    """Cross-check against Slicer's own code: slicer.util (slicer-core) and, when present, SampleData.py."""
    import slicer.util
    texts = Path(slicer.util.__file__).read_text()
    if SAMPLE_DATA_PY.is_file():
        texts += SAMPLE_DATA_PY.read_text()
    used = set(re.findall(r"[\"'](\w+File)[\"']", texts))
    assert {"VolumeFile", "SegmentationFile", "SceneFile", "TransformFile"} <= used
    assert {f["loadType"] for f in FILES} <= used


def test_every_file_exists_with_its_sha256_and_url():
    names = [f["nodeName"] for f in FILES]
    assert len(names) == len(set(names)), "node names must be unique"
    for f in FILES:
        path = ROOT / f["file"]
        assert path.is_file(), f"{f['file']} missing"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == f["sha256"], f"{f['file']}: SHA-256 differs"
        assert f["url"].startswith("https://github.com/PETWorkbench/SlicerPETWorkbench/releases/download/SampleData/")
        assert f["url"].rsplit("/", 1)[-1] == path.name        # the file Slicer downloads is this file
    for src in SPEC["sources"]:
        assert src["category"] and src["name"] and src["title"] and src["license"]


def _read(path, load_type, scene):
    import slicer
    if load_type == "VolumeFile":
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    elif load_type == "SegmentationFile":
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        storage = slicer.vtkMRMLSegmentationStorageNode()
    else:
        pytest.fail(f"no reader check for {load_type}")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"{path.name} cannot be read as {load_type}"
    return node


def test_files_load_with_the_readers_of_their_type(mrml):
    """The storage nodes Slicer's VolumeFile / SegmentationFile readers use load every file (a NIfTI label map
    read as SegmentationFile becomes one segment per label value)."""
    scene, _ = mrml
    for f in FILES:
        node = _read(ROOT / f["file"], f["loadType"], scene)
        if f["loadType"] == "SegmentationFile":
            assert node.GetSegmentation().GetNumberOfSegments() > 10
        else:
            assert node.GetImageData() is not None and node.GetImageData().GetNumberOfPoints() > 0


def test_simulated_pet_source_is_a_small_suv_pet_with_its_ct():
    import SimpleITK as sitk
    (src,) = [s for s in SPEC["sources"] if "SimulatedPET" in s["files"][0]["file"]]
    pet_f, ct_f = src["files"]
    pet, ct = sitk.ReadImage(str(ROOT / pet_f["file"])), sitk.ReadImage(str(ROOT / ct_f["file"]))
    assert pet.GetPixelID() == sitk.sitkFloat32 and ct.GetPixelID() == sitk.sitkInt16
    assert pet.GetSize() == ct.GetSize() and np.allclose(pet.GetSpacing(), ct.GetSpacing())
    assert np.allclose(pet.GetOrigin(), ct.GetOrigin()) and np.allclose(pet.GetDirection(), ct.GetDirection())
    suv = sitk.GetArrayViewFromImage(pet)
    assert 0.0 <= suv.min() and 3.0 < suv.max() < 50.0 and 0.1 < suv.mean() < 3.0      # SUV, not Bq/ml
    hu = sitk.GetArrayViewFromImage(ct)
    assert hu.min() <= -900 and hu.max() > 300                                       # HU
    assert sum((ROOT / f["file"]).stat().st_size for f in src["files"]) < 5e6
    source_md = (ROOT / pet_f["file"]).parent / "SOURCE.md"
    text = source_md.read_text()
    assert "not patient data" in text and "docs/make_sample_pet.py" in text and "seed 0" in text
    assert "Licen" in text and (ROOT / "docs" / "make_sample_pet.py").is_file()


def test_registered_with_slicers_sample_data_module(mrml, monkeypatch):
    """register_sample_data() through Slicer's real SampleData.py: every source with its file types."""
    if not SAMPLE_DATA_PY.is_file():
        pytest.skip("Slicer's SampleData.py (../shared/slicer-python) not present")
    import types

    import slicer
    qt = types.ModuleType("qt")                 # SampleData.py derives one class from qt.QObject at file scope;
    qt.QObject = type("QObject", (), {})        # nothing else of Qt exists here (no catch-all stand-in)
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.syspath_prepend(str(SAMPLE_DATA_PY.parent))
    monkeypatch.delitem(sys.modules, "SampleData", raising=False)
    from PETWorkbenchSlicer.slicer_bridge import register_sample_data
    register_sample_data()
    sources = {s.sampleName: s for cat, ss in slicer.modules.sampleDataSources.items() for s in ss}
    for src in SPEC["sources"]:
        s = sources[src["name"]]
        assert s.nodeNames == [f["nodeName"] for f in src["files"]]
        assert s.loadFileTypes == [f["loadType"] for f in src["files"]]
        assert s.checksums == [f"SHA256:{f['sha256']}" for f in src["files"]]
        assert s.fileNames == [Path(f["file"]).name for f in src["files"]]
        assert s.loadFileProperties == src.get("loadFileProperties", {})
