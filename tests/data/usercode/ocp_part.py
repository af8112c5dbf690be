"""An OCP script as its author wrote it: plain OCP (OCCT), no cadscope.

Booleans (constructor and Build forms), fillet and chamfer builders, a prism,
a thick solid, meshing and every writer, a STEP read back; then failures,
caught, whose type and message it records. It writes into its current
directory, and ``facts.json`` there.
"""

import json

from OCP.BRep import BRep_Builder
from OCP.BRepAlgoAPI import BRepAlgoAPI_Common, BRepAlgoAPI_Cut, BRepAlgoAPI_Fuse
from OCP.BRepBuilderAPI import BRepBuilderAPI_MakeFace
from OCP.BRepFilletAPI import BRepFilletAPI_MakeChamfer, BRepFilletAPI_MakeFillet
from OCP.BRepGProp import BRepGProp
from OCP.BRepMesh import BRepMesh_IncrementalMesh
from OCP.BRepOffsetAPI import BRepOffsetAPI_MakeThickSolid
from OCP.BRepPrimAPI import BRepPrimAPI_MakeBox, BRepPrimAPI_MakeCylinder, BRepPrimAPI_MakePrism
from OCP.BRepTools import BRepTools
from OCP.collections import List_TopoDS_Shape
from OCP.gp import gp_Ax2, gp_Dir, gp_Pln, gp_Pnt, gp_Vec
from OCP.GProp import GProp_GProps
from OCP.IFSelect import IFSelect_ReturnStatus
from OCP.IGESControl import IGESControl_Writer
from OCP.STEPControl import STEPControl_AsIs, STEPControl_Reader, STEPControl_Writer
from OCP.StlAPI import StlAPI_Writer
from OCP.TopAbs import TopAbs_EDGE, TopAbs_FACE
from OCP.TopExp import TopExp_Explorer
from OCP.TopoDS import TopoDS, TopoDS_Shape

facts = {"errors": {}, "returns": {}}


def attempt(name, call):
    try:
        facts["returns"][name] = repr(call())
    except Exception as exc:  # noqa: BLE001 - recorded, compared between runs
        facts["errors"][name] = [type(exc).__module__ + "." + type(exc).__qualname__, str(exc)]


def volume(shape):
    props = GProp_GProps()
    BRepGProp.VolumeProperties_s(shape, props)
    return round(props.Mass(), 6)


def items(shape, kind):
    found, explorer = [], TopExp_Explorer(shape, kind)
    while explorer.More():
        found.append(explorer.Current())
        explorer.Next()
    return found


def listed(*shapes):
    out = List_TopoDS_Shape()
    for shape in shapes:
        out.Append(shape)
    return out


base = BRepPrimAPI_MakeBox(40, 30, 10).Shape()
bore = BRepPrimAPI_MakeCylinder(gp_Ax2(gp_Pnt(20, 15, -5), gp_Dir(0, 0, 1)), 4, 20).Shape()
drilled = BRepAlgoAPI_Cut(base, bore).Shape()
fuse = BRepAlgoAPI_Fuse()
fuse.SetArguments(listed(drilled))
fuse.SetTools(listed(BRepPrimAPI_MakeCylinder(gp_Ax2(gp_Pnt(8, 8, 10), gp_Dir(0, 0, 1)), 6, 8).Shape()))
fuse.Build()
joined = fuse.Shape()
trimmed = BRepAlgoAPI_Common(joined, BRepPrimAPI_MakeBox(40, 30, 14).Shape()).Shape()
fillet = BRepFilletAPI_MakeFillet(trimmed)
for edge in items(trimmed, TopAbs_EDGE)[:4]:
    fillet.Add(1.0, TopoDS.Edge(edge))
rounded = fillet.Shape()
rib = BRepPrimAPI_MakePrism(BRepBuilderAPI_MakeFace(gp_Pln(), 0, 40, 0, 2).Face(), gp_Vec(0, 0, 20)).Shape()
chamfer = BRepFilletAPI_MakeChamfer(rib)
for edge in items(rib, TopAbs_EDGE)[:2]:
    chamfer.Add(0.5, TopoDS.Edge(edge))
chamfer.Build()
chamfered = chamfer.Shape()
plate = BRepAlgoAPI_Fuse(rounded, chamfered).Shape()
shell = BRepOffsetAPI_MakeThickSolid()
shell.MakeThickSolidByJoin(BRepPrimAPI_MakeBox(20, 20, 20).Shape(), listed(), -1.0, 1e-3)
hollow = shell.Shape()
facts["volumes"] = {"plate": volume(plate), "hollow": volume(hollow)}
facts["faces"] = {"plate": len(items(plate, TopAbs_FACE)), "hollow": len(items(hollow, TopAbs_FACE))}

BRepTools.Write_s(plate, "plate.brep")
BRepTools.Write_s(hollow, "hollow.brep")
step = STEPControl_Writer()
step.Transfer(plate, STEPControl_AsIs)
facts["returns"]["step_write"] = repr(step.Write("plate.step"))
iges = IGESControl_Writer()
iges.AddShape(plate)
iges.ComputeModel()
facts["returns"]["iges_write"] = repr(iges.Write("plate.iges"))
BRepMesh_IncrementalMesh(plate, 0.1, False, 0.5, True)
facts["returns"]["stl_write"] = repr(StlAPI_Writer().Write(plate, "plate.stl"))
reader = STEPControl_Reader()
facts["returns"]["step_read"] = repr(reader.ReadFile("plate.step") == IFSelect_ReturnStatus.IFSelect_RetDone)
reader.TransferRoots()
facts["volumes"]["read_back"] = volume(reader.OneShape())

# Failures, caught: the same types and messages (or returned statuses) with and without instrumentation.
attempt("fuse_not_shapes", lambda: BRepAlgoAPI_Fuse("a", "b"))
attempt("prism_of_a_solid", lambda: BRepPrimAPI_MakePrism(base, gp_Vec(0, 0, 1)))


def oversized_fillet():
    maker = BRepFilletAPI_MakeFillet(base)
    for edge in items(base, TopAbs_EDGE):
        maker.Add(50.0, TopoDS.Edge(edge))
    return maker.Shape()


attempt("fillet_too_large", oversized_fillet)
attempt("brep_into_missing_folder", lambda: BRepTools.Write_s(plate, "/nonexistent/folder/x.brep"))
attempt("brep_read_missing", lambda: BRepTools.Read_s(TopoDS_Shape(), "/nonexistent/x.brep", BRep_Builder()))

with open("facts.json", "w") as handle:
    json.dump(facts, handle, indent=1, sort_keys=True)
