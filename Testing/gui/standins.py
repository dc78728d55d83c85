"""Stand-ins for the CTK and qMRML widgets our .ui files and modules use, on real PySide6 widgets.

Each class declares only the properties, signals and slots of its upstream header (cited per class; copies in
../shared/slicer-python/headers) and behaves as the upstream source does where our code depends on it. Anything
else raises (PythonQtMixin): a widget that uses an attribute its upstream class lacks fails here too.
"""

from PySide6 import QtCore, QtWidgets

from pythonqt import PythonQtMixin


def shiboken_valid(obj):
    import shiboken6
    return shiboken6.isValid(obj) and "_current" in obj.__dict__


def _prop(type_name, attr, default, on_set=None):
    """A Q_PROPERTY stored in ``self._<attr>``; ``on_set(self, value)`` runs after a change."""
    key = "_" + attr

    def get(self):
        return getattr(self, key, default)

    def set_(self, value):
        setattr(self, key, value)
        if on_set is not None:
            on_set(self, value)

    return QtCore.Property(type_name, get, set_)


class _NotModelled:
    """Placeholder for upstream classes our code must not use (they exist in Slicer, not in these tests)."""

    def __init__(self, *a, **k):
        raise NotImplementedError(f"{type(self).__name__} is not modelled by the headless GUI layer")


# --------------------------------------------------------------------------------------------------- CTK

class ctkCollapsibleButton(PythonQtMixin, QtWidgets.QAbstractButton):
    """CTK Libs/Widgets/ctkCollapsibleButton.h: QAbstractButton with collapsed, collapsedHeight, flat,
    contentsFrameShape/Shadow, contentsLineWidth, contentsMidLineWidth, buttonTextAlignment, indicatorAlignment;
    signal contentsCollapsed(bool). Collapsing hides the child widgets (ctkCollapsibleButton.cxx)."""

    _cpp_name = "ctkCollapsibleButton"
    contentsCollapsed = QtCore.Signal(bool)

    def __init__(self, *args):
        title = args[0] if args and isinstance(args[0], str) else None
        parent = args[-1] if args and isinstance(args[-1], QtWidgets.QWidget) else None
        QtWidgets.QAbstractButton.__init__(self, parent)
        if title is not None:
            self.setText(title)
        self.setCheckable(True)
        self.setChecked(True)

    def paintEvent(self, event):
        pass

    def _apply_collapsed(self, value):
        for child in QtCore.QObject.findChildren(self, QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
            child.setVisible(not value)
        QtWidgets.QAbstractButton.setChecked(self, not value)
        self.contentsCollapsed.emit(value)

    def setCollapsed(self, value):
        self.collapsed = bool(value)

    collapsed = _prop(bool, "collapsed", False, _apply_collapsed)
    collapsedHeight = _prop(int, "collapsedHeight", 14)
    flat = _prop(bool, "flat", False)
    contentsLineWidth = _prop(int, "contentsLineWidth", 1)
    contentsMidLineWidth = _prop(int, "contentsMidLineWidth", 0)
    contentsFrameShape = _prop(QtWidgets.QFrame.Shape, "contentsFrameShape", QtWidgets.QFrame.Shape.NoFrame)
    contentsFrameShadow = _prop(QtWidgets.QFrame.Shadow, "contentsFrameShadow", QtWidgets.QFrame.Shadow.Plain)


class ctkPathLineEdit(PythonQtMixin, QtWidgets.QWidget):
    """CTK Libs/Widgets/ctkPathLineEdit.h: QWidget with label, filters, currentPath (USER), options, settingKey,
    showBrowseButton, showHistoryButton, minimumContentsLength, nameFilters; signals validInputChanged(bool),
    currentPathChanged(QString); slots setCurrentPath(QString), browse(), retrieveHistory(),
    addCurrentPathToHistory(). The path is held in a line edit; currentPathChanged is emitted when it changes."""

    _cpp_name = "ctkPathLineEdit"
    # enum Filter (ctkPathLineEdit.h)
    Dirs, Files, Drives, NoSymLinks, AllEntries = 0x001, 0x002, 0x004, 0x008, 0x007
    Readable, Writable, Executable = 0x010, 0x020, 0x040
    currentPathChanged = QtCore.Signal(str)
    validInputChanged = QtCore.Signal(bool)

    def __init__(self, parent=None):
        QtWidgets.QWidget.__init__(self, parent)
        self._edit = QtWidgets.QLineEdit(self)
        self._edit.textChanged.connect(self._changed)

    def _changed(self, text):
        self.currentPathChanged.emit(text)

    def _get_path(self):
        return self._edit.text()

    def _set_path(self, value):
        self._edit.setText(value)

    @QtCore.Slot(str)
    def setCurrentPath(self, path):
        self._edit.setText(path)

    @QtCore.Slot()
    def addCurrentPathToHistory(self):
        pass

    currentPath = QtCore.Property(str, _get_path, _set_path, user=True)
    label = _prop(str, "label", "")
    filters = _prop(int, "filters", 0x007 | 0x010)
    settingKey = _prop(str, "settingKey", "")
    showBrowseButton = _prop(bool, "showBrowseButton", True)
    showHistoryButton = _prop(bool, "showHistoryButton", True)
    minimumContentsLength = _prop(int, "minimumContentsLength", 0)
    nameFilters = _prop("QStringList", "nameFilters", [])


class ctkSliderWidget(PythonQtMixin, QtWidgets.QWidget):
    """CTK Libs/Widgets/ctkSliderWidget.h: QWidget with decimals, singleStep, pageStep, minimum, maximum, value,
    prefix, suffix, tickInterval, tracking, spinBoxVisible, popupSlider, invertedAppearance, invertedControls;
    signals valueChanged(double), valueIsChanging(double), decimalsChanged(int); slots setValue(double),
    setMinimum(double), setMaximum(double), setRange(double,double), reset(), setSingleStep(double),
    setDecimals(int). As ctkDoubleSpinBox does, the value is kept within [minimum, maximum] and rounded to
    ``decimals``; setting a minimum above the maximum moves the maximum (and vice versa)."""

    _cpp_name = "ctkSliderWidget"
    valueChanged = QtCore.Signal(float)
    valueIsChanging = QtCore.Signal(float)
    decimalsChanged = QtCore.Signal(int)

    def __init__(self, parent=None):
        QtWidgets.QWidget.__init__(self, parent)
        self._min, self._max, self._value, self._decimals = 0.0, 99.0, 0.0, 2

    def _constrain(self, v):
        v = min(max(float(v), self._min), self._max)
        return round(v, self._decimals)

    def _set_value(self, v):
        new = self._constrain(v)
        if new != self._value:
            self._value = new
            self.valueChanged.emit(new)

    def _set_min(self, v):
        self._min = float(v)
        self._max = max(self._max, self._min)
        self._set_value(self._value)

    def _set_max(self, v):
        self._max = float(v)
        self._min = min(self._min, self._max)
        self._set_value(self._value)

    def _set_decimals(self, d):
        self._decimals = int(d)
        self.decimalsChanged.emit(self._decimals)
        self._set_value(self._value)

    @QtCore.Slot(float)
    def setValue(self, v):
        self._set_value(v)

    @QtCore.Slot(float)
    def setMinimum(self, v):
        self._set_min(v)

    @QtCore.Slot(float)
    def setMaximum(self, v):
        self._set_max(v)

    @QtCore.Slot(float, float)
    def setRange(self, lo, hi):
        self._min, self._max = float(lo), float(max(lo, hi))
        self._set_value(self._value)

    value = QtCore.Property(float, lambda s: s._value, _set_value)
    minimum = QtCore.Property(float, lambda s: s._min, _set_min)
    maximum = QtCore.Property(float, lambda s: s._max, _set_max)
    decimals = QtCore.Property(int, lambda s: s._decimals, _set_decimals)
    singleStep = _prop(float, "singleStep", 1.0)
    pageStep = _prop(float, "pageStep", 10.0)
    prefix = _prop(str, "prefix", "")
    suffix = _prop(str, "suffix", "")
    tickInterval = _prop(float, "tickInterval", 0.0)
    tracking = _prop(bool, "tracking", True)
    spinBoxVisible = _prop(bool, "spinBoxVisible", True)
    popupSlider = _prop(bool, "popupSlider", False)
    invertedAppearance = _prop(bool, "invertedAppearance", False)
    invertedControls = _prop(bool, "invertedControls", False)


CTK_NOT_MODELLED = ("ctkCheckBox", "ctkCheckablePushButton", "ctkDoubleSlider", "ctkDoubleSpinBox", "ctkComboBox",
                    "ctkRangeWidget", "ctkDoubleRangeSlider", "ctkDirectoryButton", "ctkColorPickerButton",
                    "ctkCollapsibleGroupBox", "ctkFlowLayout")


# --------------------------------------------------------------------------------------------------- qMRML

class qMRMLWidget(PythonQtMixin, QtWidgets.QWidget):
    """Slicer Libs/MRML/Widgets/qMRMLWidget.h/.cxx: Q_INVOKABLE mrmlScene(); slot setMRMLScene(vtkMRMLScene*),
    which stores the scene and emits mrmlSceneChanged(vtkMRMLScene*) when it changes."""

    _cpp_name = "qMRMLWidget"
    mrmlSceneChanged = QtCore.Signal(object)
    _cpp_signals = {"mrmlSceneChanged(vtkMRMLScene*)": "mrmlSceneChanged"}
    _cpp_slots = {"setMRMLScene(vtkMRMLScene*)": "setMRMLScene"}

    def __init__(self, parent=None):
        QtWidgets.QWidget.__init__(self, parent)
        self._scene = None

    def mrmlScene(self):
        return self._scene

    def setMRMLScene(self, scene):
        if scene is self._scene:
            return
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)


class qMRMLNodeComboBox(PythonQtMixin, QtWidgets.QWidget):
    """Slicer Libs/MRML/Widgets/qMRMLNodeComboBox.h/.cxx with the filtering of qMRMLSortFilterProxyModel.cxx.

    Properties: currentNodeID, nodeTypes, showHidden, showChildNodeTypes, hideChildNodeTypes, baseName,
    noneEnabled, addEnabled, removeEnabled, editEnabled, renameEnabled, selectNodeUponCreation, noneDisplay,
    interactionNodeSingletonTag. Signals: currentNodeChanged(vtkMRMLNode*), currentNodeChanged(bool),
    currentNodeIDChanged(QString), nodeAdded(vtkMRMLNode*), nodeAboutToBeRemoved(vtkMRMLNode*). Slots:
    setMRMLScene(vtkMRMLScene*), setCurrentNode(vtkMRMLNode*), setCurrentNodeID(QString),
    setCurrentNodeIndex(int), addNode(QString). Invokables: mrmlScene(), nodeCount(), nodeFromIndex(int),
    currentNode(), addAttribute(QString,QString,QVariant), removeAttribute(QString,QString).

    Behaviour kept from upstream: disabled and empty until it has a scene (setMRMLScene); lists scene nodes that
    are ``IsA`` one of nodeTypes, only of exactly those classes when showChildNodeTypes is false, hides nodes
    with HideFromEditors unless showHidden, and nodes lacking a required attribute; follows nodes added to and
    removed from the scene; with noneEnabled the first item is "None", otherwise the first node is selected.
    """

    _cpp_name = "qMRMLNodeComboBox"
    currentNodeChanged = QtCore.Signal(object)
    currentNodeChangedValid = QtCore.Signal(bool)
    currentNodeIDChanged = QtCore.Signal(str)
    nodeAdded = QtCore.Signal(object)
    nodeAboutToBeRemoved = QtCore.Signal(object)
    _cpp_signals = {"currentNodeChanged(vtkMRMLNode*)": "currentNodeChanged",
                    "currentNodeChanged(bool)": "currentNodeChangedValid",
                    "nodeAdded(vtkMRMLNode*)": "nodeAdded",
                    "nodeAboutToBeRemoved(vtkMRMLNode*)": "nodeAboutToBeRemoved"}
    _cpp_slots = {"setMRMLScene(vtkMRMLScene*)": "setMRMLScene",
                  "setCurrentNode(vtkMRMLNode*)": "setCurrentNode"}

    def __init__(self, parent=None):
        QtWidgets.QWidget.__init__(self, parent)
        self._combo = QtWidgets.QComboBox(self)
        self._scene = None
        self._observations = []
        self._nodes = []               # nodes listed, in order
        self._current = None           # node ID
        self._attributes = {}          # nodeType -> (name, value)
        self.setEnabled(False)         # qMRMLNodeComboBoxPrivate::init: enabled only with a scene

    # -- properties
    def _refresh_on(self, _value):
        self._refresh()

    nodeTypes = _prop("QStringList", "nodeTypes", [], _refresh_on)
    showHidden = _prop(bool, "showHidden", False, _refresh_on)
    showChildNodeTypes = _prop(bool, "showChildNodeTypes", True, _refresh_on)
    hideChildNodeTypes = _prop("QStringList", "hideChildNodeTypes", [], _refresh_on)
    baseName = _prop(str, "baseName", "")
    noneEnabled = _prop(bool, "noneEnabled", False, _refresh_on)
    addEnabled = _prop(bool, "addEnabled", True)
    removeEnabled = _prop(bool, "removeEnabled", True)
    editEnabled = _prop(bool, "editEnabled", False)
    renameEnabled = _prop(bool, "renameEnabled", False)
    selectNodeUponCreation = _prop(bool, "selectNodeUponCreation", True)
    noneDisplay = _prop(str, "noneDisplay", "None")
    interactionNodeSingletonTag = _prop(str, "interactionNodeSingletonTag", "")

    def _get_current_id(self):
        return self._current or ""

    def _set_current_id(self, node_id):
        self.setCurrentNodeID(node_id)

    currentNodeID = QtCore.Property(str, _get_current_id, _set_current_id)

    # -- scene
    def mrmlScene(self):
        return self._scene

    def setMRMLScene(self, scene):
        if scene is self._scene:
            return
        for obj, tag in self._observations:
            obj.RemoveObserver(tag)
        self._observations = []
        self._scene = scene
        if scene is not None:
            import weakref
            ref = weakref.ref(self)

            def callback(caller, event, ref=ref):       # the widget may be gone before the scene
                w = ref()
                if w is not None and shiboken_valid(w):
                    w._refresh()
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent):
                self._observations.append((scene, scene.AddObserver(event, callback)))
        self._refresh()
        self.setEnabled(scene is not None)

    def _accepts(self, node):
        if not node.GetID():
            return False
        if not self.showHidden and node.GetHideFromEditors():
            return False
        for node_type in self.nodeTypes:
            if not node_type or not node.IsA(node_type):
                continue
            if not self.showChildNodeTypes and node_type != node.GetClassName():
                continue
            if self.showChildNodeTypes and any(node.IsA(h) for h in self.hideChildNodeTypes):
                return False
            if node_type in self._attributes:
                name, value = self._attributes[node_type]
                attr = node.GetAttribute(name)
                if attr is None or (value is not None and attr != str(value)):
                    continue
            return True
        return not [t for t in self.nodeTypes if t]

    def _refresh(self):
        previous = self._current
        nodes = []
        if self._scene is not None:
            for i in range(self._scene.GetNumberOfNodes()):
                node = self._scene.GetNthNode(i)
                if self._accepts(node):
                    nodes.append(node)
        self._nodes = nodes
        self._combo.blockSignals(True)
        self._combo.clear()
        if self.noneEnabled:
            self._combo.addItem(self.noneDisplay, "")
        for n in nodes:
            self._combo.addItem(n.GetName() or n.GetID(), n.GetID())
        ids = [n.GetID() for n in nodes]
        if previous in ids:
            current = previous
        elif self.noneEnabled or not nodes:
            current = None
        else:
            current = ids[0]                       # QComboBox selects its first item
        self._combo.setCurrentIndex(self._combo.findData(current or "") if (current or self.noneEnabled) else -1)
        self._combo.blockSignals(False)
        self._set_current(current)

    def _set_current(self, node_id):
        if node_id == self._current:
            return
        self._current = node_id
        node = self.currentNode()
        self.currentNodeChanged.emit(node)
        self.currentNodeChangedValid.emit(node is not None)
        self.currentNodeIDChanged.emit(node_id or "")

    # -- API
    def nodeCount(self):
        return len(self._nodes)

    def nodeFromIndex(self, index):
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def currentNode(self):
        if not self._current or self._scene is None:
            return None
        return self._scene.GetNodeByID(self._current)

    def setCurrentNode(self, node):
        if isinstance(node, str):                   # deprecated overload setCurrentNode(QString)
            return self.setCurrentNodeID(node)
        self.setCurrentNodeID(node.GetID() if node is not None else "")

    def setCurrentNodeID(self, node_id):
        ids = [n.GetID() for n in self._nodes]
        new = node_id if node_id in ids else None   # setCurrentNodeIDInternal: not listed -> none
        idx = self._combo.findData(new or "") if (new or self.noneEnabled) else -1
        self._combo.blockSignals(True)
        self._combo.setCurrentIndex(idx)
        self._combo.blockSignals(False)
        self._set_current(new)

    def setCurrentNodeIndex(self, index):
        node = self.nodeFromIndex(index)
        self.setCurrentNodeID(node.GetID() if node else "")

    def addNode(self, nodeType=None):
        nodeType = nodeType or (self.nodeTypes[0] if self.nodeTypes else None)
        if self._scene is None or nodeType not in self.nodeTypes:
            return None
        node = self._scene.AddNewNodeByClass(nodeType, self.baseName or None)
        if self.selectNodeUponCreation:
            self.setCurrentNode(node)
        return node

    def addAttribute(self, nodeType, attributeName, attributeValue=None):
        self._attributes[nodeType] = (attributeName, attributeValue)
        self._refresh()

    def removeAttribute(self, nodeType, attributeName):
        self._attributes.pop(nodeType, None)
        self._refresh()

    # test helper (what a user does: pick an entry of the drop-down by its text)
    def _userSelect(self, text):
        idx = self._combo.findText(text)
        if idx < 0:
            raise ValueError(f"'{text}' is not listed by {self.objectName()}: "
                             f"{[self._combo.itemText(i) for i in range(self._combo.count())]}")
        self._combo.setCurrentIndex(idx)
        self._set_current(self._combo.itemData(idx) or None)

    def _listed(self):
        return [self._combo.itemText(i) for i in range(self._combo.count())]


MRML_NOT_MODELLED = ("qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget", "qMRMLCheckableNodeComboBox",
                     "qMRMLSegmentSelectorWidget", "qMRMLSubjectHierarchyTreeView", "qMRMLScreenShotDialog")


def ctk_module():
    import types
    m = types.ModuleType("ctk")
    m.__file__ = __file__
    for cls in (ctkCollapsibleButton, ctkPathLineEdit, ctkSliderWidget):
        setattr(m, cls.__name__, cls)
    for name in CTK_NOT_MODELLED:
        setattr(m, name, type(name, (_NotModelled,), {}))

    def getattr_(name):
        raise AttributeError(f"module 'ctk' has no attribute '{name}' in the headless GUI layer")
    m.__getattr__ = getattr_
    return m


CUSTOM_WIDGETS = {c.__name__: c for c in (ctkCollapsibleButton, ctkPathLineEdit, ctkSliderWidget, qMRMLWidget,
                                          qMRMLNodeComboBox)}
