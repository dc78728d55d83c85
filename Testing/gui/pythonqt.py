"""A `qt` module that behaves as Slicer's PythonQt wrapping does, built on real PySide6 widgets.

Slicer's Python sees Qt objects through PythonQt, whose conventions differ from PySide6's:

* a Q_PROPERTY is read and written as an attribute (``button.text = "Run"``, ``box.currentIndex``); the getter
  method of the same name is hidden by the property (``button.text()`` fails in Slicer, and here);
* signals are connected by C++ signature: ``obj.connect("clicked(bool)", callable)`` (or ``obj.clicked.connect``);
* ``obj.name`` is the object name, ``obj.className()`` the C++ class name.

Everything else is PySide6's real behaviour (layouts, focus, enable state, signals). To be useful as a test the
wrapping is *strict*: writing an attribute that is not a property of the class, reading one that does not exist,
connecting an unknown signal or slot, or setting a property with a value of the wrong type raises at once, where a
permissive stand-in would hide the defect.

``QUiLoader.load`` reads a Designer ``.ui`` file the way Qt's loader does (widgets, layouts, properties, items,
``<connections>``) but refuses unknown classes, unknown properties (``stdset="0"`` ones are dynamic properties,
as in Qt) and unknown signals/slots instead of warning.
"""

import sys
import types
import xml.etree.ElementTree as ET

from PySide6 import QtCore, QtGui, QtWidgets

_PYSIDE_MODULES = (QtCore, QtGui, QtWidgets)

# Python types accepted when writing a property of the given C++ type (PythonQt converts these and only these).
_PROPERTY_TYPES = {
    "bool": (bool,),
    "int": (int,),
    "uint": (int,),
    "double": (int, float),
    "float": (int, float),
    "QString": (str,),
    "QStringList": (list, tuple),
}


class PythonQtMixin:
    """PythonQt's attribute protocol on top of a PySide6 QObject subclass (see the module docstring)."""

    # C++ signatures of signals/slots whose arguments are not Qt types (e.g. ``vtkMRMLScene*``), mapped to the
    # Python signal / method name. Stand-ins of MRML widgets fill these from their headers.
    _cpp_signals = {}
    _cpp_slots = {}

    # -- properties as attributes
    def __getattribute__(self, name):
        if name[:1] != "_" and name not in ("metaObject", "property", "setProperty"):
            mo = QtCore.QObject.metaObject(self)
            if mo.indexOfProperty(name) >= 0:
                return QtCore.QObject.property(self, name)
            if name == "name":                      # PythonQt: ``name`` is the objectName
                return QtCore.QObject.objectName(self)
        # Python-level definitions (this mixin, stand-ins) win over PySide's own attribute lookup, which would
        # otherwise return its built-in ``connect`` etc.
        for klass in type(self).__mro__:
            if klass.__module__.startswith(("PySide6", "Shiboken")):
                break
            if name in klass.__dict__:
                attr = klass.__dict__[name]
                return attr.__get__(self, type(self)) if hasattr(attr, "__get__") else attr
        return super().__getattribute__(name)

    def __setattr__(self, name, value):
        if name[:1] == "_":
            return super().__setattr__(name, value)
        if name == "name":
            return QtCore.QObject.setObjectName(self, value)
        mo = QtCore.QObject.metaObject(self)
        idx = mo.indexOfProperty(name)
        if idx < 0:
            raise AttributeError(f"{type(self).__name__} has no property '{name}' (PythonQt would not set it either)")
        prop = mo.property(idx)
        if not prop.isWritable():
            raise AttributeError(f"{type(self).__name__}.{name} is read-only")
        accepted = _PROPERTY_TYPES.get(prop.typeName())
        if accepted is not None and not isinstance(value, accepted):
            raise TypeError(f"{type(self).__name__}.{name} is {prop.typeName()}, got {type(value).__name__}")
        if prop.typeName() == "QStringList":
            if not all(isinstance(v, str) for v in value):
                raise TypeError(f"{type(self).__name__}.{name} is QStringList, got {value!r}")
            value = list(value)                     # PythonQt converts any sequence of str
        if prop.typeName() == "int" and isinstance(value, bool):
            raise TypeError(f"{type(self).__name__}.{name} is int, got bool")
        if not QtCore.QObject.setProperty(self, name, value):
            raise TypeError(f"could not set {type(self).__name__}.{name} to {value!r}")

    # -- PythonQt helpers
    def className(self):
        return self._cpp_class_name()

    @classmethod
    def _cpp_class_name(cls):
        return getattr(cls, "_cpp_name", cls.__name__)

    def findChildren(self, cls=None, name=""):
        base = getattr(cls, "_pyside_base", cls) if cls is not None else QtCore.QObject
        found = QtCore.QObject.findChildren(self, base, name) if name else QtCore.QObject.findChildren(self, base)
        return [c for c in found if cls is None or isinstance(c, base)]

    def _resolve_signal(self, signature):
        sig = QtCore.QMetaObject.normalizedSignature(signature).data().decode()
        if sig in type(self)._cpp_signals:
            return getattr(self, type(self)._cpp_signals[sig])
        if QtCore.QObject.metaObject(self).indexOfSignal(sig) < 0:
            raise AttributeError(f"{self._cpp_class_name()} has no signal {signature}")
        return sig

    def _resolve_slot(self, signature):
        sig = QtCore.QMetaObject.normalizedSignature(signature).data().decode()
        if sig in type(self)._cpp_slots:
            return getattr(self, type(self)._cpp_slots[sig])
        mo = QtCore.QObject.metaObject(self)
        if mo.indexOfSlot(sig) < 0 and mo.indexOfMethod(sig) < 0:
            raise AttributeError(f"{self._cpp_class_name()} has no slot {signature}")
        return getattr(self, sig.split("(", 1)[0])

    def connect(self, signal, receiver, slot=None):
        """PythonQt: ``connect("sig(args)", callable)`` or ``connect("sig(args)", receiver, "slot(args)")``."""
        target = receiver if slot is None else receiver._resolve_slot(slot)
        if not callable(target):
            raise TypeError(f"cannot connect {signal} to {target!r}")
        resolved = self._resolve_signal(signal)
        if isinstance(resolved, str):
            resolved = self._signal_instance(resolved)
        return resolved.connect(target)

    def disconnect(self, signal, receiver=None, slot=None):
        target = receiver if slot is None else receiver._resolve_slot(slot)
        resolved = self._resolve_signal(signal)
        if isinstance(resolved, str):
            resolved = self._signal_instance(resolved)
        return resolved.disconnect(target)

    _CPP_TO_PY = {"bool": bool, "int": int, "double": float, "QString": str, "float": float}

    def _signal_instance(self, sig):
        """The bound signal for a normalized C++ signature, overload chosen by argument types."""
        name, args = sig[:-1].split("(", 1)
        inst = getattr(self, name)
        overloads = [a for a in args.split(",") if a]
        if not overloads:
            return inst
        try:
            return inst[tuple(self._CPP_TO_PY.get(a, a) for a in overloads)] if len(overloads) > 1 \
                else inst[self._CPP_TO_PY.get(overloads[0], overloads[0])]
        except (KeyError, IndexError, TypeError):
            return inst


_wrapped = {}


def wrap_class(base):
    """PythonQt-style subclass of a PySide6 QObject class (cached, one per base)."""
    if base in _wrapped:
        return _wrapped[base]
    cls = type(base.__name__, (PythonQtMixin, base), {"_pyside_base": base, "_cpp_name": base.__name__})
    _wrapped[base] = cls
    return cls


def _lookup_pyside(name):
    for mod in _PYSIDE_MODULES:
        if hasattr(mod, name):
            return getattr(mod, name)
    return None


class _QtModule(types.ModuleType):
    """``import qt``: Qt classes by name; QObject subclasses come wrapped with PythonQt's protocol."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "QUiLoader":
            return QUiLoader
        obj = _lookup_pyside(name)
        if obj is None:
            raise AttributeError(f"module 'qt' has no attribute '{name}'")
        if isinstance(obj, type) and issubclass(obj, QtCore.QObject):
            obj = wrap_class(obj)
        setattr(self, name, obj)
        return obj


def make_qt_module():
    m = _QtModule("qt")
    m.__file__ = __file__
    return m


# ------------------------------------------------------------------------------------------------ .ui loader

DYNAMIC_PROPERTIES = ("SlicerParameterName", "SlicerPackParameterName")


class QUiLoader:
    """Reads a Designer .ui file into PythonQt-wrapped widgets; strict about classes, properties, connections.

    Custom (CTK/MRML) classes are looked up in ``QUiLoader.customWidgets`` (name -> class), which the test layer
    fills with its stand-ins; an unknown class raises (Qt's loader would silently create a plain QWidget).
    """

    customWidgets = {}

    def load(self, qfile, parent=None):
        path = qfile.fileName() if hasattr(qfile, "fileName") else str(qfile)
        root = ET.parse(path).getroot()
        top = root.find("widget")
        self._named = {}
        widget = self._widget(top, parent)
        for c in root.findall("connections/connection"):
            sender = self._named[c.findtext("sender")]
            receiver = self._named[c.findtext("receiver")]
            sender.connect(c.findtext("signal"), receiver, c.findtext("slot"))
        return widget

    def _class(self, name):
        if name in self.customWidgets:
            return self.customWidgets[name]
        base = _lookup_pyside(name)
        if base is None or not issubclass(base, QtCore.QObject):
            raise TypeError(f".ui file uses unknown widget class {name}")
        return wrap_class(base)

    def _widget(self, el, parent):
        cls = self._class(el.get("class"))
        w = cls(parent) if parent is not None else cls()
        if el.get("name"):
            w.setObjectName(el.get("name"))
            self._named[el.get("name")] = w
        combo_items = []
        for child in el:
            if child.tag == "property":
                self._set_property(w, child)
            elif child.tag == "layout":
                w.setLayout(self._layout(child, w))
            elif child.tag == "widget":
                self._widget(child, w)
            elif child.tag == "item":                       # QComboBox / QListWidget items
                text = ""
                for p in child.findall("property"):
                    if p.get("name") == "text":
                        text = self._value(p)
                combo_items.append(text)
        for text in combo_items:
            w.addItem(text)
        return w

    def _layout(self, el, parent_widget):
        cls = self._class(el.get("class"))
        lay = cls()
        if el.get("name"):
            lay.setObjectName(el.get("name"))
        for p in el.findall("property"):
            self._set_property(lay, p)
        for item in el.findall("item"):
            row, col = item.get("row"), item.get("column")
            for child in item:
                if child.tag == "widget":
                    obj = self._widget(child, parent_widget)
                elif child.tag == "layout":
                    obj = self._layout(child, parent_widget)
                elif child.tag == "spacer":
                    orient = "Vertical"
                    for p in child.findall("property"):
                        if p.get("name") == "orientation":
                            orient = p.findtext("enum").split("::")[-1]
                    pol = QtWidgets.QSizePolicy.Policy
                    obj = (QtWidgets.QSpacerItem(0, 0, pol.Minimum, pol.Expanding) if orient == "Vertical"
                           else QtWidgets.QSpacerItem(0, 0, pol.Expanding, pol.Minimum))
                else:
                    continue
                self._add(lay, obj, row, col, item)
        return lay

    @staticmethod
    def _add(lay, obj, row, col, item):
        is_layout = isinstance(obj, QtWidgets.QLayout)
        is_spacer = isinstance(obj, QtWidgets.QSpacerItem)
        if isinstance(lay, QtWidgets.QFormLayout) and row is not None:
            role = {"0": QtWidgets.QFormLayout.ItemRole.LabelRole,
                    "1": QtWidgets.QFormLayout.ItemRole.FieldRole}[col]
            if item.get("colspan") == "2":
                role = QtWidgets.QFormLayout.ItemRole.SpanningRole
            (lay.setLayout if is_layout else lay.setItem if is_spacer else lay.setWidget)(int(row), role, obj)
        elif isinstance(lay, QtWidgets.QGridLayout) and row is not None:
            rs, cs = int(item.get("rowspan", 1)), int(item.get("colspan", 1))
            if is_layout:
                lay.addLayout(obj, int(row), int(col), rs, cs)
            elif is_spacer:
                lay.addItem(obj, int(row), int(col), rs, cs)
            else:
                lay.addWidget(obj, int(row), int(col), rs, cs)
        else:
            (lay.addLayout if is_layout else lay.addItem if is_spacer else lay.addWidget)(obj)

    def _value(self, p):
        v = p[0]
        t = v.tag
        if t in ("string", "cstring"):
            return v.text or ""
        if t == "bool":
            return v.text == "true"
        if t == "number":
            return int(v.text)
        if t == "double":
            return float(v.text)
        if t == "stringlist":
            return [s.text or "" for s in v.findall("string")]
        if t in ("enum", "set"):
            return v.text
        if t == "size":
            return QtCore.QSize(int(v.findtext("width")), int(v.findtext("height")))
        raise TypeError(f"unsupported .ui property type <{t}> for {p.get('name')}")

    def _set_property(self, w, p):
        name = p.get("name")
        value = self._value(p)
        # Qt's QFormBuilder sets any property, an undeclared one becoming dynamic; here only the dynamic properties
        # Slicer defines (parameter node wrapper) or ones marked stdset="0" may be undeclared: a typo fails.
        if p.get("stdset") == "0" or name in DYNAMIC_PROPERTIES:
            QtCore.QObject.setProperty(w, name, value)
            return
        mo = w.metaObject()
        idx = mo.indexOfProperty(name)
        if idx < 0:
            raise AttributeError(f"{w.className() if hasattr(w, 'className') else type(w).__name__} "
                                 f"'{QtCore.QObject.objectName(w)}' has no property '{name}'")
        prop = mo.property(idx)
        if p[0].tag in ("enum", "set"):
            value = self._enum(prop, value)
            if not QtCore.QObject.setProperty(w, name, value):
                raise TypeError(f"could not set {name}={p[0].text} on {QtCore.QObject.objectName(w)}")
            return
        setattr(w, name, value) if isinstance(w, PythonQtMixin) else QtCore.QObject.setProperty(w, name, value)

    @staticmethod
    def _enum(prop, text):
        """'Qt::Vertical', 'QFrame::StyledPanel|QFrame::Sunken' -> the enum value of the property's type."""
        values = []
        for part in text.split("|"):
            scope, _, key = part.strip().rpartition("::")
            owner = _lookup_pyside(scope.split("::")[0]) if scope else None
            owner = owner if owner is not None else QtCore.Qt
            if not hasattr(owner, key):
                raise AttributeError(f"unknown enum value {part}")
            values.append(getattr(owner, key))
        out = values[0]
        for v in values[1:]:
            out = out | v
        return out


def install(qapp_args=None):
    """Put the PythonQt-style ``qt`` module into ``sys.modules`` and make sure a QApplication exists."""
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(qapp_args or ["pytest"])
    sys.modules["qt"] = make_qt_module()
    return app
