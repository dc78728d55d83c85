"""The headless layer itself: a widget using an attribute, property, signal or slot its upstream class lacks fails
here as it would in Slicer, instead of being accepted by a permissive stand-in."""

import pytest


def test_standins_refuse_what_their_headers_do_not_declare(slicer_app):
    import ctk
    import slicer
    combo = slicer.qMRMLNodeComboBox()
    with pytest.raises(AttributeError):
        combo.nodeType = ["vtkMRMLScalarVolumeNode"]        # typo of nodeTypes: not a property
    with pytest.raises(AttributeError):
        combo.setSceneScene(None)                            # no such method
    with pytest.raises(TypeError):
        combo.noneEnabled = "yes"                            # bool property
    with pytest.raises(AttributeError):
        combo.connect("currentNodeChanged(vtkMRMLVolumeNode*)", print)   # signature not in the header
    path = ctk.ctkPathLineEdit()
    with pytest.raises(AttributeError):
        path.text = "x"                                      # QLineEdit's property, not ctkPathLineEdit's
    with pytest.raises(NotImplementedError):
        ctk.ctkDoubleSpinBox()                               # not modelled: fail, never a dummy
    slider = ctk.ctkSliderWidget()
    slider.maximum, slider.decimals = 1.0, 1
    slider.value = 0.77
    assert slider.value == 0.8                               # ctk rounds to decimals


def test_pythonqt_protocol_on_real_qt(slicer_app):
    import qt
    b = qt.QPushButton()
    b.text = "Run"
    assert b.text == "Run"                                   # property, as PythonQt
    with pytest.raises(TypeError):
        b.text()                                             # the getter is hidden by the property
    with pytest.raises(AttributeError):
        b.textt = "x"
    hits = []
    b.connect("clicked(bool)", hits.append)
    b.click()
    assert hits == [False]
    with pytest.raises(AttributeError):
        b.connect("clickedd()", print)


def test_ui_loader_refuses_unknown_properties_and_connections(slicer_app, tmp_path):
    import qt
    bad_prop = tmp_path / "bad.ui"
    bad_prop.write_text("""<ui version="4.0"><widget class="qMRMLWidget" name="W"><layout class="QVBoxLayout">
      <item><widget class="qMRMLNodeComboBox" name="sel"><property name="showChildTypes"><bool>false</bool>
      </property></widget></item></layout></widget><connections/></ui>""")
    with pytest.raises(AttributeError, match="showChildTypes"):
        qt.QUiLoader().load(qt.QFile(str(bad_prop)))
    bad_conn = tmp_path / "conn.ui"
    bad_conn.write_text("""<ui version="4.0"><widget class="qMRMLWidget" name="W"><layout class="QVBoxLayout">
      <item><widget class="qMRMLNodeComboBox" name="sel"/></item></layout></widget><connections><connection>
      <sender>W</sender><signal>mrmlSceneChanged(vtkMRMLScene*)</signal><receiver>sel</receiver>
      <slot>setScene(vtkMRMLScene*)</slot></connection></connections></ui>""")
    with pytest.raises(AttributeError, match="setScene"):
        qt.QUiLoader().load(qt.QFile(str(bad_conn)))
