"""Every picture medvlp draws, by one orientation rule (:mod:`medvlp.viz.orient`): card and notebook figures
(:mod:`medvlp.viz.figures`, :mod:`medvlp.viz.embeddings`) and the viewer's PNGs (:mod:`medvlp.viz.png`)."""

from medvlp.viz.orient import VIEWS, Plane, display_volume, planes

__all__ = ["VIEWS", "Plane", "display_volume", "planes"]
