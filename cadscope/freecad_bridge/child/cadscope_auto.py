"""Auto-instrumentation of FreeCAD and OCP inside the CAD process (standard library only).

Switched on by ``sitecustomize`` in this folder when cadscope starts a process
with this folder on ``PYTHONPATH`` (``cadscope exec``, ``script`` and
``template`` jobs); the user's script is not changed. Each entry point below
gives the span name, attributes and metrics cadscope's JSON jobs give:

=================== ===========================================================================
span                entry points
=================== ===========================================================================
occt.boolean        ``Part.Shape.fuse/cut/common/section/multiFuse/generalFuse`` (and so
                    ``BOPTools``); recomputed ``Part::Cut/Fuse/MultiFuse/Common/MultiCommon/
                    Section`` and ``PartDesign::Boolean`` objects; OCP ``BRepAlgoAPI_Fuse/Cut/
                    Common/Section`` (``__init__(S1, S2)`` and ``Build``)
occt.feature        ``Part.Shape.makeFillet/makeChamfer/makeThickness/makeOffsetShape/extrude/
                    revolve/removeSplitter``, ``Part.Wire.makePipe/makePipeShell``,
                    ``Part.makeLoft``; every recomputed PartDesign feature (``Pad``, ``Pocket``,
                    ``Fillet``, ``Chamfer``, ``Hole``, patterns ...) and ``Part::Fillet/Chamfer/
                    Thickness/Offset/Loft/Sweep/Extrusion/Revolution`` object; OCP
                    ``BRepFilletAPI_MakeFillet/MakeChamfer``, ``BRepOffsetAPI_MakeThickSolid/
                    ThruSections/MakePipeShell/MakePipe/MakeOffsetShape``,
                    ``BRepPrimAPI_MakePrism/MakeRevol``
occt.mesh           ``Part.Shape.tessellate``, ``MeshPart.meshFromShape``, OCP
                    ``BRepMesh_IncrementalMesh``
document.create     ``FreeCAD.newDocument``
document.load       ``FreeCAD.openDocument``, ``Part.read/open/insert``, ``Part.Shape.read``,
                    ``Import.open/insert``; OCP ``STEPControl_Reader/IGESControl_Reader.ReadFile``,
                    ``BRepTools.Read_s``
document.recompute  ``Document.recompute``, with the spreadsheet cells set since the last one
                    (``Spreadsheet.Sheet.set``) as ``cad.parameters``
export              ``Part.Shape.exportStep/exportStl/exportBrep/exportIges``, ``Part.export``,
                    ``Import.export``, ``Mesh.export``, ``Mesh.Mesh.write``,
                    ``Document.save/saveAs``; OCP ``STEPControl_Writer/IGESControl_Writer.Write``,
                    ``StlAPI_Writer.Write``, ``BRepTools.Write_s``
export.transfer     OCP ``STEPControl_Writer.Transfer``, ``IGESControl_Writer.AddShape``
=================== ===========================================================================

Booleans, features, meshing and exports also record the process's peak memory
during the call (``cad.memory.peak_bytes``, metric ``occt.memory``). Created
objects are counted by class (``freecad.object_created``) and workbench modules
by import (``workbench.invocation``).

**Spans or observations.** Every call is measured, and every measurement
reaches the metrics. The first ``CADSCOPE_SPANS_PER_OPERATION`` (default 100)
calls of each span name become spans; after that a call becomes a span only
if it raised or took at least ``CADSCOPE_SLOW_CALL_MS`` (default 100 ms), and
the others are metric observations only (``<span name>.ns``, the duration in
integer nanoseconds, with the span's attributes), written in batches. At
most ``MAX_SPANS`` spans in all. A loop of ten thousand extrusions costs a
hundred spans and ten thousand buffered observations, not ten thousand spans.

**Never changing what the code does.** A wrapper passes arguments and results
through untouched and re-raises the call's own exception; anything failing in
the wrapper itself is swallowed and counted (``status()["failures"]``).
Originals stay reachable (``wrapper.__wrapped__``) and :func:`uninstrument`
puts every one of them back.

**How FreeCAD's C++ methods are wrapped.** ``Part.Shape`` and the other
FreeCAD types are immutable built-in types, and their instances find methods
in the C method table first, so setting an attribute can do nothing. Instead,
for each wrapped method, the entry in that table is renamed (``ml_name``), so
the lookup falls through to the type's dictionary, where the wrapper (a plain
function, bound as any method is) replaces the method descriptor. Each step is checked first (the
descriptor's method table entry names the method, the table is writable
memory); a method that fails a check is left alone and listed in
``status()["skipped"]``.
"""

import ctypes
import functools
import gc
import os
import re
import sys
import time

import cadscope_child
from cadscope_probe import OBSERVATIONS_PER_WRITE, _encode, peak_rss_bytes, reset_peak_rss

__all__ = ["instrument", "note_parameter", "paused", "status", "uninstrument"]

SPANS_PER_OPERATION = 100
SLOW_CALL_NS = 100_000_000
MAX_SPANS = 5_000
MAX_EXPORTS_LISTED = 100


def _env_number(name, default, scale=1):
    try:
        return int(float(os.environ.get(name, "")) * scale)
    except ValueError:
        return default


SPANS_PER_OPERATION = _env_number("CADSCOPE_SPANS_PER_OPERATION", SPANS_PER_OPERATION)
SLOW_CALL_NS = _env_number("CADSCOPE_SLOW_CALL_MS", SLOW_CALL_NS, 1_000_000)

_run = cadscope_child._run
_probe = _run.probe


class _State:
    def __init__(self):
        self.paused = 0
        self.spans = 0
        self.per_name = {}
        self.observed = 0
        self.failures = 0
        self.instrumented = []  # labels of what is wrapped now
        self.skipped = {}  # label -> why it was left alone
        self.undo = []  # (label, callable) restoring what instrument() changed
        self.recomputes = []  # open recompute records, innermost last
        self.parameters = []  # "Sheet.A1=30" since the last recompute
        self.parameters_changed = 0
        self.freecad_done = False
        self.sheet_done = False
        self.modules_done = set()


_state = _State()


def status():
    """What is instrumented, what was left alone and why, and the counts so far."""
    return {
        "instrumented": list(_state.instrumented),
        "skipped": dict(_state.skipped),
        "spans": _state.spans,
        "observed": _state.observed,
        "failures": _state.failures,
    }


class paused:
    """``with paused():`` calls go straight to the originals (cadscope's own re-exports)."""

    def __enter__(self):
        _state.paused += 1

    def __exit__(self, *exc):
        _state.paused -= 1
        return False


class _SoftFailure(Exception):
    """A call that reported a failure without raising (an OCCT writer's ``False``);
    the span's ``error.type`` is the subclass's name."""


class ExportFailed(_SoftFailure):
    pass


class LoadFailed(_SoftFailure):
    pass


class NotDone(_SoftFailure):
    pass


class RecomputeFailed(_SoftFailure):
    pass


# -- one call: a span, or an observation ------------------------------------------------------------


class _Site:
    """One instrumented entry point: its span name and how to read its attributes.

    ``attrs`` is a function of the call's arguments, or a dict when they never
    change: then a call past the budget reuses its encoded observation line.
    ``after`` adds attributes once the call returned (an export's size), or
    with ``check=True`` only checks for a failure reported without raising
    (``IsDone()``): a check runs for spans, not for each call past the budget."""

    __slots__ = ("name", "timing", "attrs", "fixed", "after", "memory", "when", "label", "observing", "head", "tail")

    def __init__(self, name, attrs, after=None, memory=None, when=None, check=False):
        self.name = name
        self.timing = name + ".ns"  # an observation: the call's duration in integer nanoseconds
        self.fixed = attrs if isinstance(attrs, dict) and (after is None or check) else None
        self.observing = False  # set once this span name's budget is spent
        # The observation line around its value, for fixed attributes: '{... "v":' and ',"a":{...}}'.
        self.head = self.tail = None
        if self.fixed is not None:
            line = _encode({"t": "metric", "n": self.timing, "v": 0, "a": self.fixed})
            head, _, tail = line.partition(',"v":0,')
            self.head, self.tail = head + ',"v":', "," + tail + "\n"
        self.attrs = (lambda args, kwargs: dict(attrs)) if isinstance(attrs, dict) else attrs
        self.after = after  # (attrs, args, kwargs, result) -> a _SoftFailure or None
        self.memory = memory  # attrs -> the occt.memory operation, or None
        self.when = when  # (args, kwargs) -> whether this call does the work
        self.label = ""


def _span_allowed(name):
    count = _state.per_name.get(name, 0)
    if count < SPANS_PER_OPERATION and _state.spans < MAX_SPANS:
        _state.per_name[name] = count + 1
        _state.spans += 1
        return True
    return False


def _begin(site, args, kwargs):
    attrs = site.attrs(args, kwargs)
    span_id = _probe.start(site.name, attrs)
    _span_allowed(site.name)  # counted once the span exists
    if site.memory is not None:
        reset_peak_rss()
    return span_id, attrs


def _end_span(site, span_id, attrs, args, kwargs, result, error):
    try:
        more = {}
        if error is None and site.after is not None:
            error = site.after(more, args, kwargs, result)
        if site.memory is not None:
            peak = peak_rss_bytes()
            more["cad.memory.peak_bytes"] = peak
            _probe.observe("occt.memory", peak, {"operation": site.memory(attrs)})
        _probe.end(span_id, more, error)
    except Exception:  # noqa: BLE001 - telemetry never raises into the script
        _state.failures += 1


def _observed(site, elapsed, args, kwargs, result, error):
    """A call past its operation's span budget: an observation, or a span after the
    fact if it failed or was slow."""
    if error is None and elapsed < SLOW_CALL_NS and site.fixed is not None:
        _state.observed += 1
        _probe.observe(site.timing, elapsed, site.fixed, site)
        return
    try:
        attrs = site.attrs(args, kwargs)
        if error is None and site.after is not None:
            error = site.after(attrs, args, kwargs, result)
        if (error is not None or elapsed >= SLOW_CALL_NS) and _state.spans < MAX_SPANS:
            _state.spans += 1
            now = time.time_ns()
            _probe.emit(site.name, attrs, now - elapsed, now, error)
        elif error is None:
            _state.observed += 1
            _probe.observe(site.timing, elapsed, attrs)
    except Exception:  # noqa: BLE001
        _state.failures += 1


def _call(site, original, args, kwargs):
    if _state.paused or (site.when is not None and not _safe_when(site, args, kwargs)):
        return original(*args, **kwargs)
    if site.observing or _budget_spent(site):
        # The common case in a loop: time the call, buffer one observation. Its
        # line is the site's, around the duration: no encoding, no method call.
        started = _clock()
        try:
            result = original(*args, **kwargs)
        except BaseException as exc:
            _observed(site, _clock() - started, args, kwargs, None, exc)
            raise
        elapsed = _clock() - started
        if site.head is not None and elapsed < SLOW_CALL_NS:
            probe = _probe
            if probe._fd is not None:
                pending = probe._pending
                pending.append(site.head + str(elapsed) + site.tail)
                if len(pending) >= OBSERVATIONS_PER_WRITE:
                    _flush(probe)
            _state.observed += 1
        else:
            _observed(site, elapsed, args, kwargs, result, None)
        return result
    try:
        span_id, attrs = _begin(site, args, kwargs)
    except Exception:  # noqa: BLE001
        _state.failures += 1
        return original(*args, **kwargs)
    try:
        result = original(*args, **kwargs)
    except BaseException as exc:
        _end_span(site, span_id, attrs, args, kwargs, None, exc)
        raise
    _end_span(site, span_id, attrs, args, kwargs, result, None)
    return result


_clock = time.perf_counter_ns


def _budget_spent(site):
    if _state.per_name.get(site.name, 0) >= SPANS_PER_OPERATION or _state.spans >= MAX_SPANS:
        site.observing = True
    return site.observing


def _flush(probe):
    try:
        probe.flush()
    except Exception:  # noqa: BLE001
        _state.failures += 1


def _safe_when(site, args, kwargs):
    try:
        return site.when(args, kwargs)
    except Exception:  # noqa: BLE001
        _state.failures += 1
        return False


def _function_wrapper(original, site):
    def wrapper(*args, **kwargs):
        return _call(site, original, args, kwargs)

    functools.update_wrapper(wrapper, original)
    wrapper.__wrapped__ = original
    return wrapper


# -- attributes -------------------------------------------------------------------------------------

_EXTENSIONS = {
    ".step": "STEP",
    ".stp": "STEP",
    ".stl": "STL",
    ".brep": "BREP",
    ".brp": "BREP",
    ".iges": "IGES",
    ".igs": "IGES",
    ".obj": "OBJ",
    ".glb": "GLB",
    ".gltf": "GLB",
    ".fcstd": "FCSTD",
}


def _path_arg(args, kwargs, index, keyword=None):
    value = kwargs.get(keyword) if keyword and keyword in kwargs else (args[index] if len(args) > index else None)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return value if isinstance(value, str) else None


def _format_of(path, default="other"):
    if not path:
        return default
    return _EXTENSIONS.get(os.path.splitext(path)[1].lower(), default)


def _count(value):
    return len(value) if isinstance(value, (list, tuple)) else 1


def _size(path):
    try:
        return os.path.getsize(path)
    except (OSError, TypeError):
        return None


def _boolean_memory(attrs):
    op = attrs.get("cad.boolean.operation")
    return "boolean_" + op if op in ("union", "cut", "common") else "boolean_complex"


def _feature_memory(attrs):
    return attrs.get("cad.feature", "feature")


def _export_memory(attrs):
    return "export_" + str(attrs.get("cad.export.format", "")).lower()


def _mesh_memory(attrs):
    return "mesh"


def _boolean(operation, operands_at=1):
    """FreeCAD's ``shape.fuse(other_or_list, ...)``: the shape itself plus its operands."""

    def attrs(args, kwargs):
        other = args[operands_at] if len(args) > operands_at else None
        return {"cad.boolean.operation": operation, "cad.solids_count": 1 + _count(other)}

    return _Site("occt.boolean", attrs, memory=_boolean_memory)


def _feature(feature, items_key=None, items_at=None):
    """A feature; ``items_at`` names the positional argument counted as ``items_key``
    (``-1``: the last list argument, as ``makeFillet(r, edges)`` and ``makeFillet(r1, r2, edges)``)."""
    if items_key is None:
        return _Site("occt.feature", {"cad.feature": feature}, memory=_feature_memory)

    def attrs(args, kwargs):
        out = {"cad.feature": feature}
        if items_key is not None:
            if items_at == -1:
                items = next((a for a in reversed(args) if isinstance(a, (list, tuple))), None)
            else:
                items = args[items_at] if len(args) > items_at else None
            if isinstance(items, (list, tuple)):
                out[items_key] = len(items)
        return out

    return _Site("occt.feature", attrs, memory=_feature_memory)


def _mesh(source, deflection_at=None, deflection_key=None, count=None):
    def attrs(args, kwargs):
        out = {"cad.mesh.source": source}
        value = kwargs.get(deflection_key) if deflection_key in (kwargs or {}) else None
        if value is None and deflection_at is not None and len(args) > deflection_at:
            value = args[deflection_at]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out["cad.mesh.linear_deflection"] = float(value)
        return out

    def after(attrs, args, kwargs, result):
        if count is not None:
            triangles = count(result)
            if triangles is not None:
                attrs["cad.mesh.triangles"] = triangles
        return None

    return _Site("occt.mesh", attrs, after=after, memory=_mesh_memory)


def _export(fmt=None, path_at=1, path_key=None, path_of=None, status=None):
    """An export; the format is ``fmt`` or the path's extension, the size is read after the call.
    ``status(result)`` is False when the call reported a failure without raising."""

    def path(args, kwargs):
        return path_of(args) if path_of is not None else _path_arg(args, kwargs, path_at, path_key)

    def attrs(args, kwargs):
        out = {"cad.export.format": fmt or _format_of(path(args, kwargs))}
        return out

    def after(attrs, args, kwargs, result):
        written = path(args, kwargs)
        if status is not None and not status(result):
            attrs["cad.export.ok"] = False
            return ExportFailed("the writer reported a failure")
        size = _size(written)
        if size is not None:
            attrs["cad.export.size_bytes"] = size
            if len(_run.exports) < MAX_EXPORTS_LISTED:
                _run.exports.append(
                    {"path": os.path.abspath(written), "format": fmt or _format_of(written), "size": size}
                )
        return None

    return _Site("export", attrs, after=after, memory=_export_memory)


def _load(fmt=None, path_at=0, workbench="Import", status=None):
    def attrs(args, kwargs):
        path = _path_arg(args, kwargs, path_at)
        return {
            "cad.document.source": "file",
            "cad.document.format": fmt or _format_of(path),
            "cad.workbench": workbench,
        }

    def after(attrs, args, kwargs, result):
        if status is not None and not status(result):
            return LoadFailed("the reader reported a failure")
        size = _size(_path_arg(args, kwargs, path_at))
        if size is not None:
            attrs["cad.document.size_bytes"] = size
        return None

    return _Site("document.load", attrs, after=after)


def _create():
    return _Site("document.create", lambda args, kwargs: {"cad.document.source": "new", "cad.workbench": "Part"})


# -- FreeCAD ---------------------------------------------------------------------------------------


def _triangles_of_tessellation(result):
    return len(result[1]) if isinstance(result, tuple) and len(result) == 2 else None


def _triangles_of_mesh(result):
    return getattr(result, "CountFacets", None)


def _document_path(args):
    if len(args) > 1 and isinstance(args[1], str):
        return args[1]
    return getattr(args[0], "FileName", None) if args else None


_FREECAD_METHODS = (
    ("Part", "Shape", "fuse", _boolean("union")),
    ("Part", "Shape", "cut", _boolean("cut")),
    ("Part", "Shape", "common", _boolean("common")),
    ("Part", "Shape", "section", _boolean("section")),
    ("Part", "Shape", "multiFuse", _boolean("union")),
    ("Part", "Shape", "generalFuse", _boolean("general_fuse")),
    ("Part", "Shape", "makeFillet", _feature("fillet", "cad.edges_count", -1)),
    ("Part", "Shape", "makeChamfer", _feature("chamfer", "cad.edges_count", -1)),
    ("Part", "Shape", "makeThickness", _feature("thickness", "cad.faces_count", 1)),
    ("Part", "Shape", "makeOffsetShape", _feature("offset")),
    ("Part", "Shape", "extrude", _feature("extrude")),
    ("Part", "Shape", "revolve", _feature("revolve")),
    ("Part", "Shape", "removeSplitter", _feature("refine")),
    ("Part", "Wire", "makePipe", _feature("pipe")),
    ("Part", "Wire", "makePipeShell", _feature("pipe_shell", "cad.profiles_count", 1)),
    ("Part", "Shape", "tessellate", _mesh("tessellate", 1, None, _triangles_of_tessellation)),
    ("Part", "Shape", "exportStep", _export("STEP")),
    ("Part", "Shape", "exportStl", _export("STL")),
    ("Part", "Shape", "exportBrep", _export("BREP")),
    ("Part", "Shape", "exportIges", _export("IGES")),
    ("Part", "Shape", "read", _load(path_at=1, workbench="Part")),
    ("Mesh", "Mesh", "write", _export(path_at=1, path_key="Filename")),
    ("FreeCAD", "Document", "saveAs", _export("FCSTD", path_of=_document_path)),
    ("FreeCAD", "Document", "save", _export("FCSTD", path_of=_document_path)),
)

_FREECAD_FUNCTIONS = (
    ("FreeCAD", "newDocument", _create()),
    ("FreeCAD", "openDocument", _load("FCSTD", workbench="Part")),
    ("Part", "export", _export(path_at=1)),
    ("Part", "read", _load(workbench="Part")),
    ("Part", "open", _load(workbench="Part")),
    ("Part", "insert", _load(workbench="Part")),
    ("Part", "makeLoft", _feature("loft", "cad.sections_count", 0)),
    ("Import", "export", _export(path_at=1)),
    ("Import", "open", _load()),
    ("Import", "insert", _load()),
    ("Mesh", "export", _export(path_at=1)),
    ("MeshPart", "meshFromShape", _mesh("mesh_from_shape", None, "LinearDeflection", _triangles_of_mesh)),
)

_WORKBENCH_OF_MODULE = {
    "Part": "Part",
    "PartDesign": "PartDesign",
    "Mesh": "Mesh",
    "MeshPart": "Mesh",
    "Import": "Import",
}

# Recomputed document objects that carry OCCT work, as the span their recompute becomes.
_PART_BOOLEANS = {
    "Part::Cut": "cut",
    "Part::Fuse": "union",
    "Part::MultiFuse": "union",
    "Part::Common": "common",
    "Part::MultiCommon": "common",
    "Part::Section": "section",
}
_PART_FEATURES = {
    "Part::Fillet": "fillet",
    "Part::Chamfer": "chamfer",
    "Part::Thickness": "thickness",
    "Part::Offset": "offset",
    "Part::Loft": "loft",
    "Part::Sweep": "sweep",
    "Part::Extrusion": "extrude",
    "Part::Revolution": "revolve",
}
_PARTDESIGN_BOOLEAN = {"Fuse": "union", "Cut": "cut", "Common": "common"}
_NOT_FEATURES = {"PartDesign::Body", "PartDesign::Point", "PartDesign::Line", "PartDesign::Plane"}
_PARTDESIGN_NONFEATURE = ("PartDesign::ShapeBinder", "PartDesign::SubShapeBinder", "PartDesign::CoordinateSystem")
_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def _object_span(obj):
    """(span name, attributes) for a recomputed object that carries OCCT work, else None."""
    type_id = obj.TypeId
    attrs = {"cad.object.name": obj.Name, "cad.object.type": type_id}
    operation = _PART_BOOLEANS.get(type_id)
    if operation is not None:
        shapes = getattr(obj, "Shapes", None)
        attrs["cad.boolean.operation"] = operation
        attrs["cad.solids_count"] = len(shapes) if isinstance(shapes, list) else 2
        return "occt.boolean", attrs
    feature = _PART_FEATURES.get(type_id)
    if feature is not None:
        attrs["cad.feature"] = feature
        return "occt.feature", attrs
    if type_id.startswith("PartDesign::") and type_id not in _NOT_FEATURES and type_id not in _PARTDESIGN_NONFEATURE:
        if type_id == "PartDesign::Boolean":
            attrs["cad.boolean.operation"] = _PARTDESIGN_BOOLEAN.get(str(getattr(obj, "Type", "")), "other")
            attrs["cad.solids_count"] = 1 + len(getattr(obj, "Group", []) or [])
            return "occt.boolean", attrs
        attrs["cad.feature"] = _SNAKE.sub("_", type_id[len("PartDesign::") :]).lower()
        return "occt.feature", attrs
    return None


def _workbench_of(type_id):
    prefix = type_id.split("::", 1)[0]
    return {"Part": "Part", "PartDesign": "PartDesign", "Mesh": "Mesh", "Import": "Import"}.get(prefix, prefix)


class _Recompute:
    __slots__ = ("span_id", "parent", "last", "objects", "started", "attrs")


def _document_workbench(doc):
    for obj in doc.Objects:
        if obj.TypeId.startswith("PartDesign::"):
            return "PartDesign"
    return "Part"


def _begin_recompute(doc):
    _run.flush_counts()
    attrs = {"cad.object_count": len(doc.Objects), "cad.workbench": _document_workbench(doc)}
    if _state.parameters_changed:
        attrs["cad.parameters.changed"] = _state.parameters_changed
        attrs["cad.parameters"] = "; ".join(_state.parameters)[:256]
        _state.parameters, _state.parameters_changed = [], 0
    record = _Recompute()
    record.objects = 0
    record.attrs = attrs
    if _span_allowed("document.recompute"):
        record.span_id = record.parent = _probe.start("document.recompute", attrs)
        record.started = 0
    else:
        record.span_id = None
        record.parent = _probe._stack[-1]
        record.started = time.perf_counter_ns()
    record.last = time.time_ns()
    _state.recomputes.append(record)
    return record


def _end_recompute(record, doc, result, error):
    try:
        if _state.recomputes and _state.recomputes[-1] is record:
            _state.recomputes.pop()
        more = {"cad.recompute.objects": record.objects}
        invalid = [o.Name for o in doc.Objects if "Invalid" in o.State] if error is None else []
        if invalid:
            more["cad.recompute.invalid"] = len(invalid)
            more["cad.recompute.invalid_objects"] = ", ".join(invalid)[:256]
            error = RecomputeFailed("%d object(s) failed to recompute: %s" % (len(invalid), ", ".join(invalid)[:200]))
        if record.span_id is not None:
            _probe.end(record.span_id, more, error)
        else:
            attrs = record.attrs
            attrs.update(more)
            elapsed = time.perf_counter_ns() - record.started
            if (error is not None or elapsed >= SLOW_CALL_NS) and _state.spans < MAX_SPANS:
                _state.spans += 1
                now = time.time_ns()
                _probe.emit("document.recompute", attrs, now - elapsed, now, error)
            elif error is None:
                _state.observed += 1
                _probe.observe("document.recompute.ns", elapsed, attrs)
        _run.flush_counts()
    except Exception:  # noqa: BLE001
        _state.failures += 1


def _recompute_call(original, doc, args, kwargs):
    if _state.paused:
        return original(doc, *args, **kwargs)
    try:
        record = _begin_recompute(doc)
    except Exception:  # noqa: BLE001
        _state.failures += 1
        return original(doc, *args, **kwargs)
    try:
        result = original(doc, *args, **kwargs)
    except BaseException as exc:
        _end_recompute(record, doc, None, exc)
        raise
    _end_recompute(record, doc, result, None)
    return result


class _Observer:
    """FreeCAD document observer: each recomputed object's time, created objects by class.

    FreeCAD 0.20 signals an object after its recompute (``slotRecomputedObject``)
    but not before, so an object's time runs from the previous signal (or the
    start of the recompute) to its own. An object that fails is not signalled:
    its time falls to the next object, and the recompute span names it.
    """

    def slotRecomputedObject(self, obj):  # noqa: N802 - FreeCAD's name
        try:
            if not _state.recomputes or _state.paused:
                return
            record = _state.recomputes[-1]
            now = time.time_ns()
            started, record.last = record.last, now
            record.objects += 1
            found = _object_span(obj)
            if found is None:
                return
            name, attrs = found
            if _span_allowed(name):
                _probe.emit(name, attrs, started, now, parent=record.parent)
            else:
                _state.observed += 1
                _probe.observe(name + ".ns", now - started, attrs)
        except Exception:  # noqa: BLE001
            _state.failures += 1

    def slotCreatedObject(self, obj):  # noqa: N802
        try:
            type_id = obj.TypeId
            if type_id == "Spreadsheet::Sheet" and not _state.sheet_done:
                _instrument_sheet(type(obj))
            if not _state.paused:
                _run.count("freecad.object_created", {"cls": type_id, "workbench": _workbench_of(type_id)})
        except Exception:  # noqa: BLE001
            _state.failures += 1


def _instrument_sheet(tp):
    # Spreadsheet's Python type is not reachable from its module: it is found
    # on the first sheet created (or loaded), before anything can set a cell.
    _state.sheet_done = True
    label = "Spreadsheet.Sheet.set"
    _mark(label, _wrap_c_method(tp, "set", label, _special_call(_sheet_set_call)))


def note_parameter(key, value):
    """A parameter the script set (a spreadsheet cell, an object's property): shown on
    the next ``document.recompute`` span as ``cad.parameters``."""
    _state.parameters_changed += 1
    if len(_state.parameters) < 16:
        _state.parameters.append(("%s=%s" % (key, value))[:64])


def _sheet_set_call(original, sheet, args, kwargs):
    result = original(sheet, *args, **kwargs)
    if not _state.paused:
        try:
            note_parameter("%s.%s" % (sheet.Name, args[0] if args else "?"), args[1] if len(args) > 1 else "")
        except Exception:  # noqa: BLE001
            _state.failures += 1
    return result


# FreeCAD's own method table entries, renamed so a lookup reaches the type's dictionary.


class _MethodDef(ctypes.Structure):
    _fields_ = [
        ("ml_name", ctypes.c_void_p),
        ("ml_meth", ctypes.c_void_p),
        ("ml_flags", ctypes.c_int),
        ("ml_doc", ctypes.c_void_p),
    ]


_METHOD_DESCRIPTOR = type(str.join)
# PyMethodDescrObject: PyObject_HEAD, d_type, d_name, d_qualname, then d_method.
_D_METHOD_OFFSET = 5 * ctypes.sizeof(ctypes.c_void_p)
_METH_KEYWORDS = 0x0002
_names_kept = {}  # new ml_name buffers, alive while in use


_mappings = []  # (low, high, writable) of this process, read again when an address is not in them


def _writable(address):
    for _attempt in range(2):
        for low, high, writable in _mappings:
            if low <= address < high:
                return writable
        try:
            with open("/proc/self/maps") as maps:
                _mappings[:] = [
                    (int(bounds.split("-")[0], 16), int(bounds.split("-")[1], 16), "w" in perms)
                    for bounds, perms in (line.split()[:2] for line in maps)
                ]
        except (OSError, ValueError):
            return False
    return False


def _wrap_c_method(tp, name, label, make_call):
    """Replace ``tp.name`` (a C method of an immutable FreeCAD type) by ``make_call``'s wrapper."""
    try:
        real_dict = gc.get_referents(tp.__dict__)[0]
        original = real_dict.get(name) if isinstance(real_dict, dict) else None
        if type(original) is not _METHOD_DESCRIPTOR or original.__objclass__ is not tp:
            return "not a C method of %s" % tp.__name__
        address = ctypes.c_void_p.from_address(id(original) + _D_METHOD_OFFSET).value
        if not address:
            return "no method table entry"
        entry = _MethodDef.from_address(address)
        if not entry.ml_name or ctypes.string_at(entry.ml_name) != name.encode():
            return "method table entry does not name %s" % name
        if not _writable(address):
            return "method table is read-only"
        takes_keywords = bool(entry.ml_flags & _METH_KEYWORDS)
    except Exception as exc:  # noqa: BLE001
        return "cannot inspect: %s" % type(exc).__name__

    method = make_call(original, name, takes_keywords)
    functools.update_wrapper(method, original)
    method.__wrapped__ = original
    renamed = ctypes.create_string_buffer(("cadscope:" + name).encode())
    old_name = entry.ml_name
    _names_kept[address] = renamed
    entry.ml_name = ctypes.addressof(renamed)
    real_dict[name] = method
    ctypes.pythonapi.PyType_Modified(ctypes.py_object(tp))

    def undo():
        real_dict[name] = original
        entry.ml_name = old_name
        ctypes.pythonapi.PyType_Modified(ctypes.py_object(tp))
        _names_kept.pop(address, None)

    _state.undo.append((label, undo))
    _state.instrumented.append(label)
    return None


def _site_call(site):
    """The function that stands for a FreeCAD C method in its type's dictionary."""

    def make(original, name, takes_keywords):
        def method(*args, **kwargs):
            if kwargs and not takes_keywords:
                # What the bound built-in says (the method descriptor would name its type).
                raise TypeError("%s() takes no keyword arguments" % name)
            return _call(site, original, args, kwargs)

        return method

    return make


def _special_call(function):
    def make(original, name, takes_keywords):
        def method(*args, **kwargs):
            if kwargs and not takes_keywords:
                raise TypeError("%s() takes no keyword arguments" % name)
            if not args:
                return original(*args, **kwargs)  # the descriptor's own error
            return function(original, args[0], args[1:], kwargs)

        return method

    return make


def _wrap_function(module, attr, label, site):
    original = getattr(module, attr, None)
    if original is None:
        return "absent"
    if getattr(original, "__wrapped__", None) is not None and getattr(original, "_cadscope", False):
        return None
    wrapper = _function_wrapper(original, site)
    wrapper._cadscope = True
    setattr(module, attr, wrapper)

    def undo():
        if getattr(module, attr, None) is wrapper:
            setattr(module, attr, original)

    _state.undo.append((label, undo))
    _state.instrumented.append(label)
    return None


def _mark(label, why):
    if why is not None:
        _state.skipped[label] = why


def _instrument_freecad_module(name, module):
    """Wrap what ``_FREECAD_*`` lists for the FreeCAD module ``name`` (once)."""
    if name in _state.modules_done:
        return
    _state.modules_done.add(name)
    for mod, attr, site in _FREECAD_FUNCTIONS:
        if mod == name:
            label = "%s.%s" % (mod, attr)
            site.label = label
            _mark(label, _wrap_function(module, attr, label, site))
    for mod, type_name, method, site in _FREECAD_METHODS:
        if mod == name:
            label = "%s.%s.%s" % (mod, type_name, method)
            site.label = label
            tp = getattr(module, type_name, None)
            if not isinstance(tp, type):
                _mark(label, "no type %s" % type_name)
                continue
            _mark(label, _wrap_c_method(tp, method, label, _site_call(site)))
    if name == "FreeCAD":
        tp = getattr(module, "Document", None)
        if isinstance(tp, type):
            _mark("FreeCAD.Document.recompute", _wrap_c_method(tp, "recompute", "FreeCAD.Document.recompute",
                                                               _special_call(_recompute_call)))  # fmt: skip
    workbench = _WORKBENCH_OF_MODULE.get(name)
    if workbench is not None:
        _run.count("workbench.invocation", {"workbench": workbench})
    if name == "Part":
        _hello_freecad(module)


def _hello_freecad(part=None):
    freecad = sys.modules.get("FreeCAD")
    if freecad is None:
        return
    major, minor, patch = (freecad.Version() + ["0", "0", "0"])[:3]
    attrs = {"engine": "freecad", "freecad_version": "%s.%s.%s" % (major, minor, patch or "0")}
    occt = getattr(part, "OCC_VERSION", None) if part is not None else None
    if occt:
        attrs["occt_version"] = str(occt)
    _probe.hello(**attrs)


def _instrument_freecad_app():
    if _state.freecad_done:
        return
    freecad = sys.modules.get("FreeCAD")
    if freecad is None or not hasattr(freecad, "addDocumentObserver"):
        return
    _state.freecad_done = True
    _instrument_freecad_module("FreeCAD", freecad)
    observer = _Observer()
    freecad.addDocumentObserver(observer)

    def undo():
        try:
            freecad.removeDocumentObserver(observer)
        except Exception:  # noqa: BLE001
            pass

    _state.undo.append(("FreeCAD document observer", undo))
    _state.instrumented.append("FreeCAD document observer")
    _hello_freecad(sys.modules.get("Part"))


# -- OCP --------------------------------------------------------------------------------------------


def _args_at_least(count):
    return lambda args, kwargs: len(args) - 1 + len(kwargs) >= count


def _not_done(args, kwargs):
    return not args[0].IsDone()


def _ocp_boolean(operation):
    def attrs(args, kwargs):
        count = 2
        if len(args) == 1:  # Build(): the arguments and tools set before
            try:
                count = args[0].Arguments().Size() + args[0].Tools().Size()
            except Exception:  # noqa: BLE001
                count = 2
        return {"cad.boolean.operation": operation, "cad.solids_count": count}

    return _Site("occt.boolean", attrs, after=_not_built, memory=_boolean_memory)


def _not_built(attrs, args, kwargs, result):
    """An OCCT algorithm reports failure by ``IsDone()``, not by raising."""
    maker = args[0] if args else None
    if hasattr(maker, "IsDone") and not maker.IsDone():
        return NotDone("the algorithm is not done")
    return None


def _ocp_feature(feature, count_edges=False):
    if not count_edges:
        return _Site("occt.feature", {"cad.feature": feature}, after=_not_built, memory=_feature_memory, check=True)

    def attrs(args, kwargs):
        out = {"cad.feature": feature}
        if len(args) == 1:
            try:
                maker = args[0]
                out["cad.edges_count"] = sum(maker.NbEdges(i) for i in range(1, maker.NbContours() + 1))
            except Exception:  # noqa: BLE001
                pass
        return out

    return _Site("occt.feature", attrs, after=_not_built, memory=_feature_memory)


def _ocp_status(result):
    if isinstance(result, bool):
        return result
    name = getattr(result, "name", None)
    return name is None or name == "IFSelect_RetDone"


def _with(site, when):
    site.when = when
    return site


def _ocp_builder(feature, count_edges=False, extra=()):
    site = _ocp_feature(feature, count_edges)
    shape = _ocp_feature(feature, count_edges)
    shape.when = _not_done
    return (("Build", site), ("Shape", shape)) + tuple((method, _ocp_feature(feature)) for method in extra)


def _ocp_table():
    boolean = {
        "BRepAlgoAPI_Fuse": "union",
        "BRepAlgoAPI_Cut": "cut",
        "BRepAlgoAPI_Common": "common",
        "BRepAlgoAPI_Section": "section",
    }
    table = []
    for cls, operation in boolean.items():
        built = _Site("occt.boolean", {"cad.boolean.operation": operation, "cad.solids_count": 2}, after=_not_built,
                      memory=_boolean_memory, when=_args_at_least(2), check=True)  # fmt: skip
        table.append(("BRepAlgoAPI", cls, "__init__", built, False))
        table.append(("BRepAlgoAPI", cls, "Build", _ocp_boolean(operation), False))
    for cls, feature in (("BRepFilletAPI_MakeFillet", "fillet"), ("BRepFilletAPI_MakeChamfer", "chamfer")):
        for method, site in _ocp_builder(feature, count_edges=True):
            table.append(("BRepFilletAPI", cls, method, site, False))
    offsets = (
        ("BRepOffsetAPI_MakeThickSolid", "thickness", ("MakeThickSolidByJoin",)),
        ("BRepOffsetAPI_ThruSections", "loft", ()),
        ("BRepOffsetAPI_MakePipeShell", "pipe_shell", ()),
        ("BRepOffsetAPI_MakeOffsetShape", "offset", ("PerformByJoin",)),
    )
    for cls, feature, extra in offsets:
        for method, site in _ocp_builder(feature, extra=extra):
            table.append(("BRepOffsetAPI", cls, method, site, False))
    table.append(("BRepOffsetAPI", "BRepOffsetAPI_MakePipe", "__init__",
                  _with(_ocp_feature("pipe"), _args_at_least(2)), False))  # fmt: skip
    for cls, feature in (("BRepPrimAPI_MakePrism", "extrude"), ("BRepPrimAPI_MakeRevol", "revolve")):
        table.append(("BRepPrimAPI", cls, "__init__", _with(_ocp_feature(feature), _args_at_least(2)), False))
    mesh = _with(_mesh("incremental_mesh", 2), _args_at_least(2))
    table.append(("BRepMesh", "BRepMesh_IncrementalMesh", "__init__", mesh, False))
    table.append(("BRepMesh", "BRepMesh_IncrementalMesh", "Perform", _mesh("incremental_mesh"), False))
    table.append(("STEPControl", "STEPControl_Writer", "Write", _export("STEP", status=_ocp_status), False))
    table.append(("STEPControl", "STEPControl_Writer", "Transfer",
                  _Site("export.transfer", lambda a, k: {"cad.export.format": "STEP"}), False))  # fmt: skip
    table.append(("STEPControl", "STEPControl_Reader", "ReadFile",
                  _load("STEP", path_at=1, status=_ocp_status), False))  # fmt: skip
    table.append(("IGESControl", "IGESControl_Writer", "Write", _export("IGES", status=_ocp_status), False))
    table.append(("IGESControl", "IGESControl_Writer", "AddShape",
                  _Site("export.transfer", lambda a, k: {"cad.export.format": "IGES"}), False))  # fmt: skip
    table.append(("IGESControl", "IGESControl_Reader", "ReadFile",
                  _load("IGES", path_at=1, status=_ocp_status), False))  # fmt: skip
    table.append(("StlAPI", "StlAPI_Writer", "Write", _export("STL", path_at=2, status=_ocp_status), False))
    table.append(("BRepTools", "BRepTools", "Write_s", _export("BREP", path_at=1, status=_ocp_status), True))
    table.append(("BRepTools", "BRepTools", "Read_s", _load("BREP", path_at=1, status=_ocp_status), True))
    return table


_KERNEL_RE = re.compile(r"libTKernel[^/]*\.so\.(\d+\.\d+\.\d+)")


def _occt_version_from_maps():
    """OCCT version of the libTKernel mapped into this process (not the wheel's tag)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                match = _KERNEL_RE.search(line)
                if match:
                    return match.group(1)
    except OSError:
        pass
    return "unknown"


def _instrument_ocp(package):
    if "OCP" in _state.modules_done:
        return
    _state.modules_done.add("OCP")
    for module_name, cls_name, method, site, static in _ocp_table():
        label = "OCP.%s.%s.%s" % (module_name, cls_name, method)
        site.label = label
        module = sys.modules.get("OCP." + module_name) or getattr(package, module_name, None)
        cls = getattr(module, cls_name, None) if module is not None else None
        if cls is None:
            _mark(label, "absent")
            continue
        own = cls.__dict__.get(method)
        original = getattr(cls, method, None)
        if original is None:
            _mark(label, "absent")
            continue
        if static:
            original = own.__func__ if isinstance(own, staticmethod) else original
            wrapper = staticmethod(_function_wrapper(original, site))
        else:
            wrapper = _function_wrapper(original, site)
        try:
            setattr(cls, method, wrapper)
        except (AttributeError, TypeError) as exc:
            _mark(label, "cannot set: %s" % type(exc).__name__)
            continue

        def undo(cls=cls, method=method, own=own):
            if own is not None:
                setattr(cls, method, own)
            else:
                delattr(cls, method)

        _state.undo.append((label, undo))
        _state.instrumented.append(label)
    _probe.hello(engine="ocp", freecad_version="none", occt_version=_occt_version_from_maps())
    _run.count("workbench.invocation", {"workbench": "Part"})


# -- imports: instrument a module once it is loaded ------------------------------------------------

_FREECAD_MODULES = {"Part", "Mesh", "MeshPart", "Import", "Spreadsheet", "PartDesign"}
_WATCHED = _FREECAD_MODULES | {"OCP", "freecad"}


class _Loader:
    """Runs the real loader, then instruments the module it loaded."""

    def __init__(self, loader, name, finder):
        self.loader = loader
        self.name = name
        self.finder = finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        spec = getattr(module, "__spec__", None)
        if self.name in self.finder.scripts:
            self.finder.loaded(self.name, module)  # FreeCAD is up: instrument it before the script runs
        try:
            self.loader.exec_module(module)
        except BaseException as exc:
            if self.name in self.finder.scripts:
                code = getattr(exc, "code", 1) if isinstance(exc, SystemExit) else 1
                if code not in (None, 0):
                    _run.fail(exc)
                # FreeCAD leaves through exit() after a SystemExit, without
                # Python's atexit: the run ends with its script.
                _finish_run()
            raise
        else:
            if self.name in self.finder.scripts:
                _finish_run()
        finally:
            # The module keeps the loader that loaded it, as without cadscope.
            if spec is not None and spec.loader is self:
                spec.loader = self.loader
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self.loader
        self.finder.loaded(self.name, module)


class _Finder:
    """A meta path finder that only watches: it hands the import to the other finders."""

    def __init__(self):
        self.scripts = set()  # module names of scripts freecadcmd imports as the main script
        self._busy = False

    def find_spec(self, name, path=None, target=None):
        if self._busy:
            return None
        if name not in _WATCHED and name not in self.scripts:
            return None
        if name in self.scripts and "FreeCAD" not in sys.modules:
            return None
        self._busy = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy = False
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, name, self)
        return spec

    def loaded(self, name, module):
        if name == "OCP":
            self._safely(_instrument_ocp, module)
            return
        # FreeCAD's application object exists once its start-up script runs
        # (which imports ``freecad``) and whenever a workbench or the main script
        # is imported. Earlier, while FreeCAD sets up its types, adding a
        # document observer crashes it.
        self._safely(_instrument_freecad_app)
        if name in _FREECAD_MODULES:
            self._safely(_instrument_freecad_module, name, module)

    @staticmethod
    def _safely(function, *args):
        try:
            function(*args)
        except Exception:  # noqa: BLE001 - an import must never fail because of cadscope
            _state.failures += 1


_finder = None


def instrument(scripts=()):
    """Wrap every entry point of FreeCAD and OCP already imported, and the others
    as they are imported. ``scripts``: module names freecadcmd will import as
    the main script (an exception leaving one fails the run). Idempotent."""
    global _finder
    if _finder is None:
        _finder = _Finder()
        sys.meta_path.insert(0, _finder)
    _finder.scripts.update(scripts)
    for name in sorted(_WATCHED):
        module = sys.modules.get(name)
        if module is not None:
            _finder.loaded(name, module)


def uninstrument():
    """Put every original back, remove the import hook and the document observer."""
    global _finder
    if _finder is not None:
        try:
            sys.meta_path.remove(_finder)
        except ValueError:
            pass
        _finder = None
    while _state.undo:
        _label, undo = _state.undo.pop()
        try:
            undo()
        except Exception:  # noqa: BLE001
            _state.failures += 1
    _state.instrumented = []
    _state.modules_done = set()
    _state.freecad_done = False
    _state.sheet_done = False


# -- a whole run: cadscope exec ---------------------------------------------------------------------


def bootstrap(argv=None):
    """Instrument this process; unless a job's launcher owns the run, open the run's
    root span now and close it, with the manifest, at exit."""
    import atexit

    argv = sys.argv if argv is None else argv
    scripts = {os.path.splitext(os.path.basename(a))[0] for a in argv if isinstance(a, str) and a.endswith(".py")}
    instrument(scripts if os.environ.get("CADSCOPE_RUN_MODE") != "job" else ())
    if os.environ.get("CADSCOPE_RUN_MODE") == "job":
        return
    script = next((a for a in argv if isinstance(a, str) and a and not a.startswith("-")), "")
    _run.begin("cad.script", {"cad.script.name": os.path.basename(script)[:128]})
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        _run.fail(value)
        previous(kind, value, tb)

    sys.excepthook = excepthook
    atexit.register(_finish_run)


def _finish_run():
    """End the run (``cadscope exec``): its root span, with the counts, then the manifest. Once."""
    if _run.root is None or _run.finished:
        return
    _run.root_attrs.update(
        {"cad.auto.spans": _state.spans, "cad.auto.observed": _state.observed, "cad.auto.failures": _state.failures}
    )
    _run.finish()
