import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for p in [ROOT] + sorted(ROOT.glob("*Module")):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def mrml():
    """A fresh headless MRML scene with module logics registered: returns (scene, logics dict)."""
    from headless import init_headless_slicer, install_module_shims
    install_module_shims()
    scene, app_logic, logics = init_headless_slicer()
    yield scene, logics
    scene.Clear(1)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("shared real data folder not present beside the checkout")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_model_cache(tmp_path, monkeypatch):
    """Tests never touch the user's model cache."""
    monkeypatch.setenv("PETWORKBENCH_MODELS_DIR", str(tmp_path / "model-cache"))


def pytest_ignore_collect(collection_path, config):
    """Testing/gui runs in its own pytest process (`make test` runs it second): it installs Slicer's real Python
    layer (qt, ctk, parameter node wrapper) where the tests here use the logic-only stand-ins of headless.py."""
    gui = Path(__file__).resolve().parent / "gui"
    if Path(collection_path).resolve() != gui:
        return None
    targets = [Path(a.split("::")[0]).resolve() for a in config.invocation_params.args if not a.startswith("-")]
    return not any(t == gui or gui in t.parents for t in targets)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Untrained synthesis and segmentation weights of the engines' own architectures, CPU-instant."""
    import torch
    from PETWorkbenchLib.models import save_checkpoint
    from SegmentationModuleLib.model import build_network
    from SegmentationModuleLib.train import load_config as seg_config
    from SynthesisModuleLib import build_model, load_config
    d = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    cfg = load_config("drmc_cpu")
    cfg["model"].update(n_feats=4, res_num=1, hidden_dim=4, num_heads=1)
    cfg["train"]["patch_size"] = 16
    syn = save_checkpoint(d / "syn.pt", cfg, build_model(cfg["model"]).state_dict())
    scfg = seg_config("ldos_cpu_demo")
    scfg["network"].update(features=[4, 8], strides=[1, 2], n_blocks=[1, 1])
    scfg["patch_size"] = [16, 16, 16]
    seg = save_checkpoint(d / "seg.pt", scfg, build_network(scfg).state_dict())
    return {"synthesis": str(syn), "segmentation": str(seg)}
