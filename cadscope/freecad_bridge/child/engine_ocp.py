"""OCP engine: bare OpenCASCADE through cadquery-ocp, run by ``python engine_ocp.py``.

No FreeCAD here, so ``freecad_version`` is ``"none"``; the OCCT version is read
from the OCCT kernel library actually mapped into this process.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cadscope_job  # noqa: E402
from OCP.Bnd import Bnd_Box  # noqa: E402
from OCP.BRep import (
    BRep_Builder,  # noqa: E402
    BRep_Tool,  # noqa: E402
)
from OCP.BRepAlgoAPI import BRepAlgoAPI_Common, BRepAlgoAPI_Cut, BRepAlgoAPI_Fuse  # noqa: E402
from OCP.BRepBndLib import BRepBndLib  # noqa: E402
from OCP.BRepBuilderAPI import (  # noqa: E402
    BRepBuilderAPI_MakeFace,
    BRepBuilderAPI_MakePolygon,
    BRepBuilderAPI_Transform,
)
from OCP.BRepCheck import BRepCheck_Analyzer  # noqa: E402
from OCP.BRepFilletAPI import BRepFilletAPI_MakeChamfer, BRepFilletAPI_MakeFillet  # noqa: E402
from OCP.BRepGProp import BRepGProp  # noqa: E402
from OCP.BRepMesh import BRepMesh_IncrementalMesh  # noqa: E402
from OCP.BRepPrimAPI import (  # noqa: E402
    BRepPrimAPI_MakeBox,
    BRepPrimAPI_MakeCone,
    BRepPrimAPI_MakeCylinder,
    BRepPrimAPI_MakePrism,
    BRepPrimAPI_MakeSphere,
    BRepPrimAPI_MakeTorus,
)
from OCP.BRepTools import BRepTools  # noqa: E402
from OCP.gp import gp_Pnt, gp_Trsf, gp_Vec  # noqa: E402
from OCP.GProp import GProp_GProps  # noqa: E402
from OCP.IFSelect import IFSelect_ReturnStatus  # noqa: E402
from OCP.IGESControl import IGESControl_Controller, IGESControl_Writer  # noqa: E402
from OCP.Interface import Interface_Static  # noqa: E402
from OCP.STEPControl import (  # noqa: E402
    STEPControl_AsIs,
    STEPControl_Controller,
    STEPControl_Reader,
    STEPControl_Writer,
)
from OCP.StlAPI import StlAPI_Writer  # noqa: E402
from OCP.TopAbs import TopAbs_EDGE, TopAbs_FACE, TopAbs_SHELL, TopAbs_SOLID, TopAbs_VERTEX  # noqa: E402
from OCP.TopExp import TopExp  # noqa: E402
from OCP.TopoDS import TopoDS, TopoDS_Compound, TopoDS_Shape  # noqa: E402

try:  # OCP 8.0 binds OCCT's collections as templates
    from OCP.collections import (
        IndexedMap_TopoDS_Shape_TopTools_ShapeMapHasher as TopTools_IndexedMapOfShape,
    )
    from OCP.collections import (
        List_TopoDS_Shape as TopTools_ListOfShape,
    )
except ImportError:  # OCP 7.x, by their OCCT names
    from OCP.TopTools import TopTools_IndexedMapOfShape, TopTools_ListOfShape

_KERNEL_RE = re.compile(r"libTKernel[^/]*\.so\.(\d+\.\d+\.\d+)")


def occt_version():
    """OCCT version of the libTKernel mapped into this process (not the wheel's tag)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            match = _KERNEL_RE.search(line)
            if match:
                return match.group(1)
    return "unknown"


def _trsf(m):
    trsf = gp_Trsf()
    trsf.SetValues(*(m[0] + m[1] + m[2]))
    return trsf


def _indexed(shape, kind):
    shapes = TopTools_IndexedMapOfShape()
    TopExp.MapShapes_s(shape, kind, shapes)
    return [shapes.FindKey(i) for i in range(1, shapes.Extent() + 1)]


def _tools(shapes):
    items = TopTools_ListOfShape()
    for shape in shapes:
        items.Append(shape)
    return items


class OCPBackend:
    engine = "ocp"
    formats = ("step", "stl", "brep", "iges")

    def __init__(self):
        self._objects = 0
        self._props = {}
        self._versions = {"freecad_version": "none", "occt_version": occt_version()}
        self.options = cadscope_job.effective_options(None)

    def set_options(self, options):
        """The job's work options (``cadscope_job.effective_options``), for every later call."""
        self.options = options

    def versions(self):
        return dict(self._versions)

    def workbenches(self):
        # The OCCT toolkits standing in for FreeCAD's workbenches; Assembly4's
        # attachment rules are emulated in cadscope_job, not imported.
        return {"Part": True, "Import": True, "Mesh": True, "Assembly4": False}

    def export_workbench(self, fmt):
        return {"stl": "Mesh", "obj": "Mesh"}.get(fmt, "Import")

    def object_class(self, kind, operation=None):
        if kind == "boolean":
            return {"union": "BRepAlgoAPI_Fuse", "cut": "BRepAlgoAPI_Cut", "common": "BRepAlgoAPI_Common"}[operation]
        return {
            "box": "BRepPrimAPI_MakeBox",
            "cylinder": "BRepPrimAPI_MakeCylinder",
            "sphere": "BRepPrimAPI_MakeSphere",
            "cone": "BRepPrimAPI_MakeCone",
            "torus": "BRepPrimAPI_MakeTorus",
            "extrusion": "BRepPrimAPI_MakePrism",
            "fillet": "BRepFilletAPI_MakeFillet",
            "chamfer": "BRepFilletAPI_MakeChamfer",
            "assembly": "TopoDS_Compound",
        }[kind]

    def new_document(self, name):
        self._objects = 0

    def object_count(self):
        return self._objects

    def primitive(self, step, matrix):
        # Built in recompute(), like FreeCAD's parametric objects.
        self._objects += 1
        return (step, matrix)

    def recompute(self, handles):
        shapes = {}
        for name, (step, matrix) in handles.items():
            kind = step["kind"]
            if kind == "box":
                shape = BRepPrimAPI_MakeBox(step["length"], step["width"], step["height"]).Shape()
            elif kind == "cylinder":
                shape = BRepPrimAPI_MakeCylinder(step["radius"], step["height"]).Shape()
            elif kind == "sphere":
                shape = BRepPrimAPI_MakeSphere(step["radius"]).Shape()
            elif kind == "cone":
                shape = BRepPrimAPI_MakeCone(step["radius1"], step["radius2"], step["height"]).Shape()
            elif kind == "torus":
                shape = BRepPrimAPI_MakeTorus(step["radius1"], step["radius2"]).Shape()
            else:
                polygon = BRepBuilderAPI_MakePolygon()
                for x, y in step["points"]:
                    polygon.Add(gp_Pnt(x, y, 0))
                polygon.Close()
                face = BRepBuilderAPI_MakeFace(polygon.Wire()).Face()
                shape = BRepPrimAPI_MakePrism(face, gp_Vec(0, 0, step["height"])).Shape()
            shapes[name] = self.transform(shape, matrix)
        return shapes

    def boolean(self, operation, shapes):
        algo = {"union": BRepAlgoAPI_Fuse, "cut": BRepAlgoAPI_Cut, "common": BRepAlgoAPI_Common}[operation]()
        algo.SetRunParallel(bool(self.options["parallel"]))
        if self.options["fuzzy_value"] > 0:
            algo.SetFuzzyValue(self.options["fuzzy_value"])
        algo.SetArguments(_tools(shapes[:1]))
        algo.SetTools(_tools(shapes[1:]))
        algo.Build()
        if not algo.IsDone():
            raise cadscope_job.JobError("OCCT boolean %s failed" % operation)
        self._objects += 1
        return algo.Shape()

    def feature(self, kind, shape, size, edges):
        all_edges = _indexed(shape, TopAbs_EDGE)
        maker = BRepFilletAPI_MakeFillet(shape) if kind == "fillet" else BRepFilletAPI_MakeChamfer(shape)
        for index in edges:
            maker.Add(size, TopoDS.Edge(all_edges[index]))
        maker.Build()
        if not maker.IsDone():
            raise cadscope_job.JobError("OCCT %s of size %s failed" % (kind, size))
        self._objects += 1
        return maker.Shape()

    def edge_boxes(self, shape):
        boxes = []
        for edge in _indexed(shape, TopAbs_EDGE):
            box = Bnd_Box()
            BRepBndLib.Add_s(edge, box, False)
            lo, hi = box.CornerMin(), box.CornerMax()
            boxes.append((lo.X(), lo.Y(), lo.Z(), hi.X(), hi.Y(), hi.Z()))
        return boxes

    def properties(self, shape):
        volume, area = GProp_GProps(), GProp_GProps()
        BRepGProp.VolumeProperties_s(shape, volume)
        BRepGProp.SurfaceProperties_s(shape, area)
        return {
            "volume": volume.Mass(),
            "area": area.Mass(),
            "solids": len(_indexed(shape, TopAbs_SOLID)),
            "faces": len(_indexed(shape, TopAbs_FACE)),
            "edges": len(_indexed(shape, TopAbs_EDGE)),
            "vertices": len(_indexed(shape, TopAbs_VERTEX)),
        }

    def geometry(self, shape):
        """The contract's geometry of one shape (validity is asked separately)."""
        volume, area = GProp_GProps(), GProp_GProps()
        BRepGProp.VolumeProperties_s(shape, volume)
        BRepGProp.SurfaceProperties_s(shape, area)
        box = Bnd_Box()
        BRepBndLib.Add_s(shape, box, False)
        box.SetGap(0.0)  # as FreeCAD's BoundBox: no tolerance margin
        lo, hi = box.CornerMin(), box.CornerMax()
        centre = volume.CentreOfMass()
        return {
            "volume": volume.Mass(),
            "area": area.Mass(),
            "bbox": [lo.X(), lo.Y(), lo.Z(), hi.X(), hi.Y(), hi.Z()],
            "center_of_mass": [centre.X(), centre.Y(), centre.Z()],
            "solids": len(_indexed(shape, TopAbs_SOLID)),
            "shells": len(_indexed(shape, TopAbs_SHELL)),
            "faces": len(_indexed(shape, TopAbs_FACE)),
            "edges": len(_indexed(shape, TopAbs_EDGE)),
            "vertices": len(_indexed(shape, TopAbs_VERTEX)),
        }

    def vertices(self, shape):
        points = (BRep_Tool.Pnt_s(TopoDS.Vertex(v)) for v in _indexed(shape, TopAbs_VERTEX))
        return [(p.X(), p.Y(), p.Z()) for p in points]

    def add_result(self, name, shape, container=False):
        self._props.setdefault(name, {})

    def set_property(self, name, key, value):
        self._props.setdefault(name, {})[key] = value

    def set_appearance(self, name, appearance):
        self._props.setdefault(name, {})["appearance"] = dict(appearance)

    def load(self, path, fmt):
        """A STEP or BREP file as one shape: its only solid, or a compound of them."""
        if fmt == "step":
            reader = STEPControl_Reader()
            if reader.ReadFile(path) != IFSelect_ReturnStatus.IFSelect_RetDone:
                raise cadscope_job.JobError("OCCT could not read the STEP document")
            reader.TransferRoots()
            shape = reader.OneShape()
        elif fmt == "brep":
            shape = TopoDS_Shape()
            if not BRepTools.Read_s(shape, path, BRep_Builder()):
                raise cadscope_job.JobError("OCCT could not read the BREP document")
        else:
            raise cadscope_job.JobError("the OCP engine cannot read %r documents" % fmt)
        self._objects += 1
        solids = _indexed(shape, TopAbs_SOLID)
        if len(solids) == 1:
            return TopoDS.Solid(solids[0])
        if not solids:
            raise cadscope_job.JobError("the input document contains no solid")
        return self.compound(solids)

    def is_valid(self, shape):
        return bool(BRepCheck_Analyzer(shape).IsValid())

    def transform(self, shape, matrix):
        return BRepBuilderAPI_Transform(shape, _trsf(matrix), True).Shape()

    def compound(self, shapes):
        compound = TopoDS_Compound()
        builder = BRep_Builder()
        builder.MakeCompound(compound)
        for shape in shapes:
            builder.Add(compound, shape)
        return compound

    def export(self, shape, fmt, path):
        options = self.options
        if fmt == "step":
            STEPControl_Controller.Init_s()
            Interface_Static.SetCVal_s("write.step.schema", cadscope_job.STEP_SCHEMAS[options["step_schema"]])
            Interface_Static.SetCVal_s("write.step.unit", cadscope_job.STEP_UNITS[options["step_units"]])
            writer = STEPControl_Writer()
            writer.Transfer(shape, STEPControl_AsIs)
            ok = writer.Write(path) == IFSelect_ReturnStatus.IFSelect_RetDone
        elif fmt == "brep":
            ok = BRepTools.Write_s(shape, path)
        elif fmt == "iges":
            IGESControl_Controller.Init_s()
            mode = 1 if options["iges_mode"] == "brep" else 0
            Interface_Static.SetIVal_s("write.iges.brep.mode", mode)
            writer = IGESControl_Writer(cadscope_job.IGES_UNITS[options["iges_units"]], mode)
            writer.AddShape(shape)
            writer.ComputeModel()
            ok = writer.Write(path)
        elif fmt == "stl":
            # As FreeCAD's MeshPart meshes: the shape's old triangulation dropped, then one
            # incremental mesh, not in parallel.
            BRepTools.Clean_s(shape)
            BRepMesh_IncrementalMesh(
                shape, options["linear_deflection"], bool(options["relative"]), options["angular_deflection"], False
            )
            writer = StlAPI_Writer()
            writer.ASCIIMode = options["stl_format"] == "ascii"
            ok = writer.Write(shape, path)
        else:
            raise cadscope_job.JobError("format %r not supported by the OCP engine" % fmt)
        if not ok:
            raise cadscope_job.JobError("OCCT failed to write %s" % fmt)


if __name__ == "__main__":
    cadscope_job.main(OCPBackend)
