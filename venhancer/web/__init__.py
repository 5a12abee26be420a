"""A local web page for VEnhancer (`venhancer-web`, `python -m venhancer.web`): see server.py."""

from venhancer.web.server import main

__all__ = ["main"]
