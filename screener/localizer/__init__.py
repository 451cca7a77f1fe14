"""Spine localizers: find the vertebrae of an axial CT and label their levels.

Public API
----------
``locate_spine(volume, method="classical") -> SpineLocalization``
    Run the named localizer. ``"classical"`` needs no weights
    (:mod:`screener.localizer.classical`); ``"totalsegmentator"`` uses the
    optional TotalSegmentator package and its weights
    (:mod:`screener.localizer.totalsegmentator`).
``SpineLocalizer``
    The protocol every localizer implements: ``locate(volume)``.

When L1 cannot be found or labelled the result has no ``"L1"`` entry and its
``reason`` contains "L1 not in view".
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from screener.domain import SpineLocalization, VertebraLocation, Volume

__all__ = ["SpineLocalizer", "locate_spine", "get_localizer", "METHODS", "VertebraLocation"]

METHODS = ("classical", "totalsegmentator")


@runtime_checkable
class SpineLocalizer(Protocol):
    """Anything that can locate and label the vertebrae of an axial CT volume."""

    def locate(self, volume: Volume) -> SpineLocalization:
        """Return the labelled vertebrae of ``volume`` (see :class:`SpineLocalization`)."""
        ...


def get_localizer(method: str = "classical") -> SpineLocalizer:
    """Return the localizer called ``method``.

    Parameters
    ----------
    method : str
        ``"classical"`` or ``"totalsegmentator"`` (the site switch
        ``localizer = "..."``).

    Raises
    ------
    ValueError
        For an unknown method name.
    """
    if method == "classical":
        from screener.localizer.classical import ClassicalLocalizer

        return ClassicalLocalizer()
    if method == "totalsegmentator":
        from screener.localizer.totalsegmentator import TotalSegmentatorLocalizer

        return TotalSegmentatorLocalizer()
    raise ValueError(f"unknown spine localizer {method!r}: choose one of {', '.join(METHODS)}")


def locate_spine(volume: Volume, method: str = "classical") -> SpineLocalization:
    """Locate and label the vertebrae of an axial CT ``volume``.

    Parameters
    ----------
    volume : Volume
        Axial CT in HU (:class:`screener.domain.Volume`).
    method : str
        Localizer name, see :func:`get_localizer`.

    Returns
    -------
    SpineLocalization
        Labelled vertebrae; without ``"L1"`` and with ``reason`` containing
        "L1 not in view" when L1 cannot be found or labelled.
    """
    return get_localizer(method).locate(volume)
