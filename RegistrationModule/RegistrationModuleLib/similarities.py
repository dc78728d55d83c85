"""The similarity terms registration offers: the one list that the command line, the engine and the module's
user interface read. Torch-free, so that Slicer can list the terms before PyTorch is installed.

Adding a term is one entry here plus its builder in :mod:`RegistrationModuleLib.similarity`:
``builder(fixed, moving, window, mode) -> loss(warp, weight)`` (``lncc_term`` also takes ``eps``, LNCC's
stabiliser), where ``warp(tensor)`` resamples a moving-side
tensor with the current deformation (prepared for the sampler ``mode``, see ``_moving_side``) and
``weight`` is the voxel weight map (masks) or None.
"""

from __future__ import annotations

from dataclasses import dataclass

from PETWorkbenchLib.errors import InputError


# how the similarity samples the moving image at the full-resolution level (instance.optimise; METHOD.md)
INTERPOLATIONS = ("corrected", "cubic", "linear")


@dataclass(frozen=True)
class SimilarityTerm:
    name: str
    description: str            # one line: the CLI help and the module's tooltip
    builder: str = ""           # name of the builder in similarity.py; empty for a label-only term
    multimodal: bool = False    # suits different modalities (the moment-based pre-alignment is used then)
    in_ui: bool = True          # offered in the module's similarity list
    # the engine's default regulariser and smoothness with this term (METHOD.md: measured on the benchmark cases;
    # curvature lets affine-like components drift under the weak, biased gradients of MIND on PET: 7.6 mm error
    # on the demo's PET -> CT against 3.8 mm with diffusion)
    regularizer: str = "curvature"
    smoothness: float = 64.0
    # weight σ of the coupling penalty (σ/2)‖(u − ū)/h‖² (instance.py); lncc: 1.5 with the corrected sampling
    # (MNI / CT error 0.0799 / 0.079 at 1.0, 0.0806 / 0.068 at 1.5, 0.083 / 0.063 at 2.0; METHOD.md)
    penalty: float = 1.0

    @property
    def uses_images(self):
        return bool(self.builder)

    @property
    def uses_lncc(self):
        """Built on LNCC, so LNCC's stabiliser (``lncc_eps``) applies."""
        return self.builder == "lncc_term"


SIMILARITIES = {t.name: t for t in (
    SimilarityTerm("lncc", "local normalised cross-correlation: same modality", "lncc_term", penalty=1.5),
    SimilarityTerm("mind", "MIND descriptors: PET/CT/MR (modality independent)", "mind_term", multimodal=True,
                   regularizer="diffusion", smoothness=1.0),
    SimilarityTerm("mse", "mean squared difference: same modality and intensity scale", "mse_term"),
    SimilarityTerm("dice", "soft Dice of the label maps only (needs fixed and moving labels)", in_ui=False),
)}


def similarity_term(name: str) -> SimilarityTerm:
    """The registered term ``name``; InputError listing the registered ones otherwise."""
    if name not in SIMILARITIES:
        raise InputError(f"unknown similarity '{name}': choose one of {', '.join(SIMILARITIES)}")
    return SIMILARITIES[name]


def similarity_names(ui_only: bool = False) -> list[str]:
    return [n for n, t in SIMILARITIES.items() if t.in_ui or not ui_only]


def describe(ui_only: bool = False) -> str:
    """'name: description; ...' for help texts and tooltips."""
    return "; ".join(f"{n}: {SIMILARITIES[n].description}" for n in similarity_names(ui_only))
