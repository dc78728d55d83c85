"""Sample Data: every PETWorkbench source loads through Slicer's own SampleData logic (download, checksum, IO type)
once the application has started, as in Slicer. Downloads come from a local server the test starts."""

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

import slicer_layer

ROOT = Path(__file__).resolve().parents[2]
SPEC = json.loads((ROOT / "Resources" / "SampleData" / "SampleData.json").read_text())
NODE_CLASS = {"VolumeFile": "vtkMRMLScalarVolumeNode", "SegmentationFile": "vtkMRMLSegmentationNode"}


@pytest.fixture
def local_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for src in SPEC["sources"]:
        for f in src["files"]:
            shutil.copy(ROOT / f["file"], served / f["url"].rsplit("/", 1)[-1])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.mark.parametrize("source", [s["name"] for s in SPEC["sources"]])
def test_source_loads_with_declared_io_types(scene, local_server, source):
    # Guards: loadType "Volume"/"LabelMapVolume" are not Slicer IO file types, so nothing loaded.
    import slicer
    import SampleData
    for name in ("SynthesisModule", "SegmentationModule", "RegistrationModule", "ReconstructionModule"):
        slicer_layer.load_module(name)
    SampleData.SampleDataLogic.registerUrlRewriteRule(
        "petworkbench-test", lambda url: local_server + url.rsplit("/", 1)[-1] if "PETWorkbench" in url else url)
    slicer.app.startupCompleted.emit()                # Slicer's signal: modules register their sample data
    entry = next(s for s in SPEC["sources"] if s["name"] == source)
    nodes = SampleData.SampleDataLogic().downloadSamples(source)
    assert len(nodes) == len(entry["files"])
    loaded = slicer_layer._state.loaded[-len(entry["files"]):]
    for node, f, (io_type, props, node_id) in zip(nodes, entry["files"], loaded):
        assert io_type == f["loadType"] and node.GetID() == node_id
        assert node.GetName() == f["nodeName"]
        assert node.IsA(NODE_CLASS[f["loadType"]])
