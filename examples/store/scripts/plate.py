"""A registered FreeCAD script: a plate with a row of holes, sized by the job's parameters.

It runs in FreeCAD's own Python; ``cadscope_child`` hands it the job's parameters
and takes its result. It writes its outputs into its current folder.
"""

import cadscope_child as cadscope
import FreeCAD
import Part

p = cadscope.parameters()
plate = Part.makeBox(p["length"], p["width"], p["thickness"])
pitch = p["length"] / (p["holes"] + 1)
for i in range(p["holes"]):
    hole = Part.makeCylinder(p["hole_radius"], p["thickness"] + 2, FreeCAD.Vector(pitch * (i + 1), p["width"] / 2, -1))
    plate = plate.cut(hole)
plate.exportStep("plate.step")
cadscope.result({"volume": plate.Volume})
