"""DICOM outputs: TID 1500 Comprehensive SR (:mod:`.sr`) and secondary captures (:mod:`.sc`).

The only package of screener that imports highdicom.
"""
from __future__ import annotations

__all__ = ["build_sr", "write_sr", "build_sc", "write_sc", "render_overlay"]


def __getattr__(name: str):  # noqa: ANN202 - lazy re-exports keep imports cheap
    if name in ("build_sr", "write_sr"):
        from screener.reporting import sr
        return getattr(sr, name)
    if name in ("build_sc", "write_sc", "render_overlay"):
        from screener.reporting import sc
        return getattr(sc, name)
    raise AttributeError(name)
