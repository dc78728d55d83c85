"""Fixtures of the reliability tests; helpers are in reliability_tools.py."""

import pytest


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
