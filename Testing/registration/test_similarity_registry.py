"""The similarity registry is the one list: a term added there is offered by the CLI and the module, and run by the
engine, with no other change."""

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "RegistrationModule"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from PETWorkbenchLib.errors import InputError
from RegistrationModuleLib import similarities
from RegistrationModuleLib.similarities import SimilarityTerm


@pytest.fixture
def extra_term(monkeypatch):
    """A new term, added the way a developer would: one registry entry naming its builder."""
    table = dict(similarities.SIMILARITIES)
    table["msd"] = SimilarityTerm("msd", "mean squared difference, added for this test", "mse_term")
    monkeypatch.setattr(similarities, "SIMILARITIES", table)
    return "msd"


def _pair():
    rng = np.random.default_rng(0)
    from scipy import ndimage
    a = ndimage.gaussian_filter(rng.normal(size=(32, 32)), 2.0).astype(np.float32)
    fixed = sitk.GetImageFromArray(a)
    moving = sitk.GetImageFromArray(np.roll(a, 1, axis=0))
    return fixed, moving


def test_a_registered_term_is_offered_and_run_everywhere(extra_term):
    from PETWorkbenchApp.cli import build_parser
    from RegistrationModuleLib import register
    parser = build_parser()
    register_parser = parser._subparsers._group_actions[0].choices["register"]
    choices = next(a.choices for a in register_parser._actions if a.dest == "similarity")
    assert extra_term in choices                                         # the CLI lists it
    assert extra_term in similarities.similarity_names(ui_only=True)     # the module's list and its Choice
    fixed, moving = _pair()
    res = register(fixed, moving, similarity=extra_term, iterations=(5,), prealign="none", device="cpu")
    assert res.summary["levels"][-1]["similarity"] >= 0                  # the engine ran the new term


def test_unknown_terms_are_refused_with_the_list():
    with pytest.raises(InputError, match="lncc, mind, mse, dice"):
        similarities.similarity_term("ncc")
    assert similarities.similarity_names(ui_only=True) == ["lncc", "mind", "mse"]
