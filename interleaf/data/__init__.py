"""Built-in procedural datasets (the shapes world) and their evaluation analyser."""

from interleaf.data.shapes import Scene, Shape, ShapesWorld

__all__ = ["Scene", "Shape", "ShapesWorld"]
