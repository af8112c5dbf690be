"""cadscope: observability for CAD generation fleets (Celery + FreeCAD/OCCT)."""

__version__ = "0.1.0"
