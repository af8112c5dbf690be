"""FreeCAD engine: run by ``freecadcmd engine_freecad.py`` (FreeCAD's own Python).

Primitives are parametric document objects (``Part::Box``...) so that the
document's recompute is real FreeCAD work; booleans and features are OCCT
calls through ``Part.TopoShape`` whose results become ``Part::Feature`` objects.
"""

import ctypes
import importlib.util
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Mesh and MeshPart load with the engine, as the OCP engine loads its STL writer:
# loading the Mesh workbench takes longer than meshing a small part, and is no
# part of an export.
import cadscope_job  # noqa: E402
import FreeCAD  # noqa: E402  (FreeCAD's Python only)
import Mesh  # noqa: E402
import MeshPart  # noqa: E402
import Part  # noqa: E402

_CLASSES = {
    "box": "Part::Box",
    "cylinder": "Part::Cylinder",
    "sphere": "Part::Sphere",
    "cone": "Part::Cone",
    "torus": "Part::Torus",
    "extrusion": "Part::Feature",
}


class _ExchangeSettings:
    """OCCT's data exchange settings (``Interface_Static``) in this process.

    FreeCAD 0.20 reads its STEP and IGES preferences once, when Part loads, and
    has no Python call to change them: the job's schema, units and IGES mode
    are set where FreeCAD's own ``exportStep``/``exportIges`` read them, through
    OCCT's public C++ entry points in the library FreeCAD itself loaded.
    """

    def __init__(self):
        path = None
        with open("/proc/self/maps") as maps:
            for line in maps:
                match = re.search(r"(/\S*libTKXSBase\S*\.so[.0-9]*)", line)
                if match:
                    path = match.group(1)
                    break
        if path is None:
            raise cadscope_job.JobError("OCCT's data exchange library is not loaded in FreeCAD")
        library = ctypes.CDLL(path)
        self._set_text = library._ZN16Interface_Static7SetCValEPKcS1_
        self._set_text.argtypes, self._set_text.restype = [ctypes.c_char_p, ctypes.c_char_p], ctypes.c_bool
        self._set_int = library._ZN16Interface_Static7SetIValEPKci
        self._set_int.argtypes, self._set_int.restype = [ctypes.c_char_p, ctypes.c_int], ctypes.c_bool

    def text(self, name, value):
        if not self._set_text(name.encode(), value.encode()):
            raise cadscope_job.JobError("OCCT refused %s=%s" % (name, value))

    def integer(self, name, value):
        if not self._set_int(name.encode(), int(value)):
            raise cadscope_job.JobError("OCCT refused %s=%s" % (name, value))


def _matrix(m):
    return FreeCAD.Matrix(*(m[0] + m[1] + m[2] + [0.0, 0.0, 0.0, 1.0]))


class FreeCADBackend:
    engine = "freecad"
    formats = ("step", "stl", "brep", "iges", "obj")

    def __init__(self):
        self.doc = None
        self._objects = {}
        self._exchange = None
        self.options = cadscope_job.effective_options(None)

    def set_options(self, options):
        """The job's work options (``cadscope_job.effective_options``), for every later call."""
        if not options["parallel"]:
            # Part.Shape's multi-operand booleans always ask OCCT to run in parallel.
            raise cadscope_job.JobError("FreeCAD runs booleans in parallel only (options.parallel=false: use OCP)")
        self.options = options

    def exchange(self):
        if self._exchange is None:
            self._exchange = _ExchangeSettings()
        return self._exchange

    def versions(self):
        major, minor, patch = FreeCAD.Version()[:3]
        return {"freecad_version": "%s.%s.%s" % (major, minor, patch or "0"), "occt_version": Part.OCC_VERSION}

    def workbenches(self):
        found = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
        return {
            "Part": found("Part"),
            "Import": found("Import"),
            "Mesh": found("Mesh"),
            "Assembly4": found("Asm4_locator"),
        }

    def export_workbench(self, fmt):
        return {"stl": "Mesh", "obj": "Mesh"}.get(fmt, "Import")

    def object_class(self, kind, operation=None):
        if kind == "boolean":
            return {"union": "Part::MultiFuse", "cut": "Part::Cut", "common": "Part::MultiCommon"}[operation]
        if kind in ("fillet", "chamfer"):
            return "Part::" + kind.capitalize()
        if kind == "assembly":
            return "App::Part"
        return _CLASSES[kind]

    def new_document(self, name):
        self.doc = FreeCAD.newDocument("job")
        self.doc.Label = name

    def object_count(self):
        return len(self.doc.Objects)

    def primitive(self, step, matrix):
        kind = step["kind"]
        obj = self.doc.addObject(_CLASSES[kind], step["name"])
        if kind == "box":
            obj.Length, obj.Width, obj.Height = step["length"], step["width"], step["height"]
        elif kind == "cylinder":
            obj.Radius, obj.Height = step["radius"], step["height"]
        elif kind == "sphere":
            obj.Radius = step["radius"]
        elif kind == "cone":
            obj.Radius1, obj.Radius2, obj.Height = step["radius1"], step["radius2"], step["height"]
        elif kind == "torus":
            obj.Radius1, obj.Radius2 = step["radius1"], step["radius2"]
        elif kind == "extrusion":
            points = [FreeCAD.Vector(x, y, 0) for x, y in step["points"]]
            wire = Part.makePolygon(points + points[:1])
            obj.Shape = Part.Face(wire).extrude(FreeCAD.Vector(0, 0, step["height"]))
        obj.Placement = FreeCAD.Placement(_matrix(matrix))
        return obj

    def recompute(self, handles):
        self.doc.recompute()
        shapes = {}
        for name, obj in handles.items():
            if not obj.isValid():
                raise cadscope_job.JobError("object %r failed to recompute" % name)
            shapes[name] = obj.Shape.copy()
        return shapes

    def load(self, path, fmt):
        """A STEP, BREP or FCStd document as one shape: its only solid, or a compound of them."""
        if fmt == "fcstd":
            source = FreeCAD.openDocument(path, True)  # hidden: no GUI objects
            try:
                top = [o for o in source.Objects if getattr(o, "Shape", None) is not None and not o.InList]
                solids = [solid for o in top for solid in o.Shape.Solids]
                solids = [solid.copy() for solid in solids]
            finally:
                FreeCAD.closeDocument(source.Name)
        else:
            shape = Part.Shape()
            shape.read(path)  # the format follows the file's extension (.step, .brep)
            solids = list(shape.Solids)
        if not solids:
            raise cadscope_job.JobError("the input document contains no solid")
        loaded = solids[0] if len(solids) == 1 else Part.makeCompound(solids)
        obj = self.doc.addObject("Part::Feature", "imported")
        obj.Shape = loaded
        return loaded

    def is_valid(self, shape):
        return bool(shape.isValid())

    def boolean(self, operation, shapes):
        base, tools = shapes[0], shapes[1:]
        fuzzy = self.options["fuzzy_value"]  # 0: exact, as OCCT's default
        if operation == "union":
            return base.fuse(tools, fuzzy)
        if operation == "cut":
            return base.cut(tools, fuzzy)
        return base.common(tools, fuzzy)

    def feature(self, kind, shape, size, edges):
        selected = [shape.Edges[i] for i in edges]
        if kind == "fillet":
            return shape.makeFillet(size, selected)
        return shape.makeChamfer(size, selected)

    def edge_boxes(self, shape):
        return [(b.XMin, b.YMin, b.ZMin, b.XMax, b.YMax, b.ZMax) for b in (edge.BoundBox for edge in shape.Edges)]

    def properties(self, shape):
        return {
            "volume": shape.Volume,
            "area": shape.Area,
            "solids": len(shape.Solids),
            "faces": len(shape.Faces),
            "edges": len(shape.Edges),
            "vertices": len(shape.Vertexes),
        }

    def geometry(self, shape):
        """The contract's geometry of one shape (validity is asked separately)."""
        box = shape.BoundBox
        solids = shape.Solids
        mass = sum(s.Volume for s in solids)
        if solids and mass > 0:
            centre = [sum(s.Volume * getattr(s.CenterOfMass, axis) for s in solids) / mass for axis in "xyz"]
        else:
            centre = [0.0, 0.0, 0.0]
        return {
            "volume": shape.Volume,
            "area": shape.Area,
            "bbox": [box.XMin, box.YMin, box.ZMin, box.XMax, box.YMax, box.ZMax],
            "center_of_mass": centre,
            "solids": len(solids),
            "shells": len(shape.Shells),
            "faces": len(shape.Faces),
            "edges": len(shape.Edges),
            "vertices": len(shape.Vertexes),
        }

    def vertices(self, shape):
        return [(v.X, v.Y, v.Z) for v in shape.Vertexes]

    def add_result(self, name, shape, container=False):
        if container:
            part = self.doc.addObject("App::Part", name)
            obj = self.doc.addObject("Part::Feature", name + "_shape")
            obj.Shape = shape
            part.addObject(obj)
        else:
            obj = self.doc.addObject("Part::Feature", name + "_result")
            obj.Shape = shape
        self._objects[name] = obj

    def set_property(self, name, key, value):
        obj = self._objects[name]
        if key not in obj.PropertiesList:
            obj.addProperty("App::PropertyFloat", key, "Material")
        setattr(obj, key, value)

    def set_appearance(self, name, appearance):
        obj = self._objects[name]
        obj.addProperty("App::PropertyString", "Appearance", "Material")
        obj.Appearance = json.dumps(appearance, sort_keys=True)

    def transform(self, shape, matrix):
        placed = shape.copy()
        placed.transformShape(_matrix(matrix))
        return placed

    def compound(self, shapes):
        return Part.makeCompound(shapes)

    def export(self, shape, fmt, path):
        options = self.options
        if fmt == "step":
            exchange = self.exchange()
            exchange.text("write.step.schema", cadscope_job.STEP_SCHEMAS[options["step_schema"]])
            exchange.text("write.step.unit", cadscope_job.STEP_UNITS[options["step_units"]])
            shape.exportStep(path)
        elif fmt == "brep":
            shape.exportBrep(path)
        elif fmt == "iges":
            exchange = self.exchange()
            exchange.integer("write.iges.brep.mode", 1 if options["iges_mode"] == "brep" else 0)
            exchange.text("write.iges.unit", cadscope_job.IGES_UNITS[options["iges_units"]])
            shape.exportIges(path)
        elif fmt in ("stl", "obj"):
            # Not Shape.exportStl: it meshes at a tolerance of its own. MeshPart meshes as
            # the OCP engine does (OCCT's incremental mesh at the job's deflections).
            mesh = MeshPart.meshFromShape(
                Shape=shape,
                LinearDeflection=options["linear_deflection"],
                AngularDeflection=options["angular_deflection"],
                Relative=bool(options["relative"]),
            )
            if mesh.CountFacets == 0 and shape.Faces:
                # The mesher gives up without an exception (out of memory, among others).
                raise cadscope_job.JobError("FreeCAD's mesher made no facet of %d faces" % len(shape.Faces))
            kind = "OBJ" if fmt == "obj" else "AST" if options["stl_format"] == "ascii" else "STL"
            Mesh.Mesh(mesh).write(path, kind)
        else:
            raise cadscope_job.JobError("format %r not supported by FreeCAD engine" % fmt)


cadscope_job.main(FreeCADBackend)
