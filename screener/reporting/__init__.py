"""DICOM outputs: TID 1500 Comprehensive SR (:mod:`.sr`), secondary captures (:mod:`.sc`) and a
Segmentation of the measured ROIs (:mod:`.seg`).

The only package of screener that imports highdicom.
"""
from __future__ import annotations

__all__ = ["build_sc", "build_seg", "build_sr", "render_overlay", "write_sc", "write_sr"]


def __getattr__(name: str):  # noqa: ANN202 - lazy re-exports keep imports cheap
    if name in ("build_sr", "write_sr"):
        from screener.reporting import sr
        return getattr(sr, name)
    if name == "build_seg":
        from screener.reporting import seg
        return seg.build_seg
    if name in ("build_sc", "write_sc", "render_overlay"):
        from screener.reporting import sc
        return getattr(sc, name)
    raise AttributeError(name)
