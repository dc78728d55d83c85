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
