"""A FreeCAD script as its author wrote it: plain FreeCAD, no cadscope.

Booleans and edge features on shapes, an extrusion, a PartDesign body (pad,
pocket, fillet), a spreadsheet-driven document recomputed after a parameter
change, and every export path; then failures, caught, whose type and message
it records. It writes into its current directory, and ``facts.json`` there.
"""

import json

import FreeCAD
import Import
import Mesh
import Part
import Sketcher
import Spreadsheet  # noqa: F401 - the Spreadsheet::Sheet type

V = FreeCAD.Vector
facts = {"errors": {}}


def attempt(name, call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - recorded, compared between runs
        facts["errors"][name] = [type(exc).__module__ + "." + type(exc).__qualname__, str(exc)]


def vertical_edges(shape, height):
    return [e for e in shape.Edges if e.BoundBox.ZLength > height - 1e-6 and e.BoundBox.XLength < 1e-6
            and e.BoundBox.YLength < 1e-6]  # fmt: skip


# Shapes: a drilled plate with a boss, trimmed, filleted, chamfered, with an extruded rib.
base = Part.makeBox(40, 30, 10)
drilled = base.cut(Part.makeCylinder(4, 20, V(20, 15, -5)))
joined = drilled.fuse([Part.makeCylinder(6, 8, V(8, 8, 10))])
trimmed = joined.common(Part.makeBox(40, 30, 14))
edges = vertical_edges(trimmed, 10)
rounded = trimmed.makeFillet(1.5, edges)
top = [e for e in rounded.Edges if abs(e.BoundBox.ZMin - 10) < 1e-6 and abs(e.BoundBox.ZMax - 10) < 1e-6][:4]
chamfered = rounded.makeChamfer(0.5, top)
rib = Part.Face(Part.makePolygon([V(0, 0, 0), V(40, 0, 0), V(40, 2, 0), V(0, 2, 0), V(0, 0, 0)])).extrude(V(0, 0, 20))
plate = chamfered.fuse(rib)
facts["fillet_edges"] = len(edges)
facts["chamfer_edges"] = len(top)
plate.exportBrep("plate.brep")
plate.exportStep("plate.step")
plate.exportIges("plate.iges")
plate.exportStl("plate.stl")

# A PartDesign body: a padded rectangle, a pocketed hole, two filleted edges.
doc = FreeCAD.newDocument("usercode")
body = doc.addObject("PartDesign::Body", "Body")


def sketch(name, geometry):
    sk = body.newObject("Sketcher::SketchObject", name)
    sk.Support = (doc.getObject("XY_Plane"), [""])
    sk.MapMode = "FlatFace"
    for item in geometry:
        sk.addGeometry(item)
    return sk


corners = [V(0, 0, 0), V(30, 0, 0), V(30, 20, 0), V(0, 20, 0)]
outline = sketch("Outline", [Part.LineSegment(corners[i], corners[(i + 1) % 4]) for i in range(4)])
for i in range(4):
    outline.addConstraint(Sketcher.Constraint("Coincident", i, 2, (i + 1) % 4, 1))
pad = body.newObject("PartDesign::Pad", "Pad")
pad.Profile = outline
pad.Length = 8
circle = sketch("Hole", [Part.Circle(V(15, 10, 0), V(0, 0, 1), 3)])
pocket = body.newObject("PartDesign::Pocket", "Pocket")
pocket.Profile = circle
pocket.Type = 1  # through all
doc.recompute()
fillet = body.newObject("PartDesign::Fillet", "Fillet")
fillet.Base = (pocket, ["Edge1", "Edge3"])
fillet.Radius = 1
doc.recompute()

# A spreadsheet-driven part: the block's length is a cell; the slot follows it.
sheet = doc.addObject("Spreadsheet::Sheet", "Params")
sheet.set("B1", "50")
sheet.setAlias("B1", "Length")
block = doc.addObject("Part::Box", "Block")
block.setExpression("Length", "Params.Length")
block.Width, block.Height = 20, 10
slot = doc.addObject("Part::Box", "Slot")
slot.setExpression("Length", "Params.Length / 2")
slot.Width, slot.Height = 4, 20
slot.Placement.Base = V(5, 8, -5)
slotted = doc.addObject("Part::Cut", "Slotted")
slotted.Base, slotted.Tool = block, slot
doc.recompute()
sheet.set("B1", "70")
doc.recompute()

facts["volumes"] = {o.Name: round(o.Shape.Volume, 6) for o in doc.Objects if o.TypeId in ("PartDesign::Body",
                    "Part::Cut")} | {"plate": round(plate.Volume, 6)}  # fmt: skip
facts["objects"] = [[o.Name, o.TypeId, "Invalid" in o.State] for o in doc.Objects]
body.Shape.exportBrep("body.brep")
slotted.Shape.exportBrep("slotted.brep")
Part.export([slotted], "slotted_part.brep")
Import.export([body], "body.step")
Mesh.export([slotted], "slotted.stl")
doc.saveAs(FreeCAD.ActiveDocument.FileName or __import__("os").path.abspath("usercode.FCStd"))

# Failures, caught: the same types and messages with and without instrumentation.
attempt("fillet_too_large", lambda: base.makeFillet(50, base.Edges))
attempt("fuse_not_a_shape", lambda: base.fuse(42))
attempt("fuse_keyword", lambda: base.fuse(plate, tolerance=0.1))
attempt("fuse_no_argument", lambda: base.fuse())
attempt("unbound_no_self", lambda: Part.Shape.fuse())
attempt("export_into_missing_folder", lambda: base.exportStep("/nonexistent/folder/x.step"))
attempt("open_missing", lambda: FreeCAD.openDocument("/nonexistent/missing.FCStd"))

with open("facts.json", "w") as handle:
    json.dump(facts, handle, indent=1, sort_keys=True)
