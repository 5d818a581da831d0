"""ralph-uv: run Ralph loops of AI coding agents here or on remote machines, and watch,
attach to, steer, stop and checkpoint any of them from anywhere."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
