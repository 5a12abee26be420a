"""VEnhancer: generative space-time enhancement of videos (spatial/temporal super-resolution and refinement)."""

__version__ = "0.1.0"
