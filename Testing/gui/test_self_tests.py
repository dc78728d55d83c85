"""Each module's Slicer self-test (what Slicer's test runner executes) passes on the headless layer, widget
steps included."""

import pytest

import slicer_layer


@pytest.mark.parametrize("module", ["SynthesisModule", "SegmentationModule", "RegistrationModule",
                                    "ReconstructionModule"])
def test_module_self_test(scene, module):
    # Guards: the self-tests never touched the widgets; their widget steps fail on every defect above (empty
    # selectors, panel not built) and on Resources missing where the module runs from.
    import slicer
    m = slicer_layer.load_module(module)
    m._widget = None
    rep = m.widgetRepresentation()
    clicks = []
    rep.self().ui.applyButton.clicked.connect(lambda *a: clicks.append(1))
    try:
        slicer.selfTests[module]()
        assert clicks, f"{module}'s self-test never pressed Apply in its widget"
    finally:
        rep.exit()
        rep.self().cleanup()
