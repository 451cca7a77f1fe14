"""Findings: what a protocol measured, in a form every report writer understands.

A :class:`Finding` is protocol-agnostic: the SR builder
(:mod:`screener.reporting.sr`) turns any list of findings into TID 1500
measurement groups, the SC writer burns :attr:`Finding.overlay` into a
secondary capture, and :meth:`Finding.to_record` is what ``screener results``
exports (CSV/JSON) and the database stores.

Coded concepts are :class:`pydicom.sr.coding.Code` so that this module does
not import highdicom.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.sr.coding import Code

from screener.jsonable import to_jsonable


@dataclass
class Measurement:
    """One numeric result (a TID 300 measurement in the SR).

    Attributes
    ----------
    name : str
        Human-readable name, also the CSV column, e.g. ``"L1 attenuation mean"``.
    value : float
        The value.
    unit : str
        UCUM code, e.g. ``"[hnsf'U]"``, ``"mg/cm3"``, ``"mm2"``.
    concept : pydicom.sr.coding.Code
        Coded concept name of the measurement in the SR.
    unit_meaning : str
        Code meaning of the unit (defaults to the UCUM code).
    derivation : pydicom.sr.coding.Code, optional
        E.g. SCT Mean / Standard Deviation.
    method : pydicom.sr.coding.Code, optional
        Measurement method concept (e.g. "Estimated by algorithm from CT"); the SR sets it
        for model estimates from the source modality when it is not given.
    caveats : list of str
        Caveats that qualify THIS measurement (the SR puts them under its NUM item);
        caveats of the whole finding stay in :attr:`Finding.flags`.
    reference : dict, optional
        The reference population of a T-score (:meth:`screener.references.Reference.to_record`:
        ``key``, ``population``, ``sex``, ``mean``, ``sd``, ``unit``, ``source``).
    interval : tuple of float, optional
        ``(low, high)`` prediction interval of the value at :attr:`interval_level`.
    interval_level : float
        Nominal coverage of :attr:`interval` (0.9 = 90 %).
    interval_method : str
        How the interval was made (e.g. split-conformal on validation residuals).
    """

    name: str
    value: float
    unit: str
    concept: Code
    unit_meaning: str = ""
    derivation: Code | None = None
    method: Code | None = None
    caveats: list[str] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    interval: tuple[float, float] | None = None
    interval_level: float = 0.9
    interval_method: str = ""

    def unit_code(self) -> Code:
        """The UCUM unit as a coded concept."""
        return Code(self.unit, "UCUM", self.unit_meaning or self.unit)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "Measurement":
        """The measurement of a :meth:`to_record` dict (what the database stores)."""
        def code(v: Any) -> Code:
            return Code(str(v[0]), str(v[1]), str(v[2]))
        interval = rec.get("interval")
        return cls(name=str(rec["name"]), value=float(rec["value"]), unit=str(rec.get("unit", "")),
                   concept=code(rec["code"]), method=code(rec["method"]) if rec.get("method") else None,
                   caveats=list(rec.get("caveats", [])), reference=rec.get("reference"),
                   interval=(float(interval[0]), float(interval[1])) if interval else None,
                   interval_level=float(rec.get("interval_level", 0.9)),
                   interval_method=str(rec.get("interval_method", "")))

    def to_record(self) -> dict[str, Any]:
        """JSON-able dict: ``name``, ``value``, ``unit``, the concept's ``code``; ``method``,
        ``caveats``, ``reference`` and ``interval`` (``[low, high]``, ``interval_level``,
        ``interval_method``) when set."""
        rec: dict[str, Any] = {"name": self.name, "value": float(self.value), "unit": self.unit,
                               "code": [self.concept.value, self.concept.scheme_designator,
                                        self.concept.meaning]}
        if self.method is not None:
            rec["method"] = [self.method.value, self.method.scheme_designator, self.method.meaning]
        if self.caveats:
            rec["caveats"] = list(self.caveats)
        if self.reference is not None:
            rec["reference"] = dict(self.reference)
        if self.interval is not None:
            rec["interval"] = [float(self.interval[0]), float(self.interval[1])]
            rec["interval_level"] = float(self.interval_level)
            rec["interval_method"] = self.interval_method
        return rec


@dataclass
class RoiGeometry:
    """A planar region of interest on one source image.

    Attributes
    ----------
    source_sop_instance_uid, source_sop_class_uid : str
        The image the ROI lies on.
    polygon : numpy.ndarray
        Closed polygon ``(N, 2)`` in DICOM SCOORD image coordinates
        ``(column, row)``: the top-left corner of the top-left pixel is
        ``(0, 0)``, so pixel ``[j, i]`` has its centre at ``(i + 0.5, j + 0.5)``.
        First point == last point.
    centre_mm : tuple of float
        ROI centre in patient coordinates (LPS, mm).
    area_mm2 : float
        Area actually measured (pixel count x pixel area).
    slice_index : int
        Index of the source slice in the :class:`~screener.domain.Volume`.
    frame_number : int, optional
        1-based frame of a multi-frame (Enhanced CT) source image.
    """

    source_sop_instance_uid: str
    source_sop_class_uid: str
    polygon: np.ndarray
    centre_mm: tuple[float, float, float]
    area_mm2: float
    slice_index: int = -1
    frame_number: int | None = None


@dataclass
class ImageLayer:
    """A per-pixel layer a protocol made on source slices: a mask (a segmented structure, e.g. the
    vertebral body it outlined) or a map (an explanation map, values in [0, 1]).

    The SEG writer (:mod:`screener.reporting.seg`) adds each mask as a segment beside the ROIs; the
    Parametric Map writer (:mod:`screener.reporting.pmap`) writes the maps.  Layers are kept in
    memory only: they are not part of :meth:`Finding.to_record`.

    Attributes
    ----------
    kind : str
        ``"mask"`` (boolean planes) or ``"map"`` (``float32`` planes in [0, 1]).
    label : str
        What it shows, e.g. ``"L1 vertebral body"`` or ``"Grad-RAMP"``.
    planes : dict of str to numpy.ndarray
        Source SOP Instance UID -> ``(rows, columns)`` plane on that image's pixel grid.
    method : str
        How it was made (the algorithm and its reference), for the object's description.
    """

    kind: str
    label: str
    planes: dict[str, np.ndarray]
    method: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("mask", "map"):
            raise ValueError(f"ImageLayer kind must be 'mask' or 'map', not {self.kind!r}")


@dataclass
class PlaneMap:
    """An explanation map on the plane a network read, in patient space: pixel ``[j, i]`` of
    ``values`` has its centre at ``origin + i * spacing[1] * u + j * spacing[0] * v``
    (:func:`screener.preprocess.sampling.plane_points`).  Kept in memory for checks against truth
    (``benchmarks/eval_ct_interventions.py``: the share of the map on the target bone); not recorded.

    Attributes
    ----------
    values : numpy.ndarray
        ``(H, W)`` map in [0, 1].
    origin, u, v : sequence of float
        The plane's first pixel centre (LPS mm) and its column / row directions.
    spacing : tuple of float
        ``(row, column)`` pixel spacing, mm.
    label : str
        What the plane shows, e.g. ``"L1"`` or ``"R"`` (the femur's side).
    """

    values: np.ndarray
    origin: tuple[float, float, float]
    u: tuple[float, float, float]
    v: tuple[float, float, float]
    spacing: tuple[float, float]
    label: str = ""

    @classmethod
    def on(cls, values: np.ndarray, plane: dict[str, Any], label: str = "") -> "PlaneMap":
        """A map on a plane given as ``{"origin", "u", "v", "spacing", ...}``."""
        def t(x: Any) -> tuple[float, ...]:
            return tuple(float(c) for c in np.asarray(x, dtype=np.float64).ravel())
        return cls(np.asarray(values, dtype=np.float32), t(plane["origin"]), t(plane["u"]), t(plane["v"]),
                   (float(plane["spacing"][0]), float(plane["spacing"][1])), label)


@dataclass
class Finding:
    """A protocol's result for one anatomical site.

    Attributes
    ----------
    protocol, protocol_version : str
        Which protocol produced it (also the SR's algorithm identification);
        the pipeline sets ``protocol_version`` from
        :meth:`~screener.protocols.base.Protocol.algorithm_version` (a model
        protocol's bundle version, e.g. hip_xray 0.5.0).
    site : str
        Anatomical label, e.g. ``"L1"``.
    site_code : pydicom.sr.coding.Code, optional
        Coded finding site (SCT), e.g. L1 vertebra.
    measurements : list of Measurement
    category : str
        Qualitative result, e.g. ``"likely osteoporosis"``; ``""`` when none.
    category_code : pydicom.sr.coding.Code, optional
        Coded value of ``category`` for the SR.
    flags : list of str
        Caveats a reader must see (contrast, kVp, ROI shrunk, ...).
    roi : RoiGeometry, optional
    z_extent_mm : tuple of float, optional
        Inferior and superior patient z (mm) of the measured structure.
    study_uid, series_uid : str
    referenced_sop_instance_uids : list of str
        All source images the measurement used (ROI slice first).
    overlay : numpy.ndarray, optional
        ``uint8 (rows, cols, 3)`` RGB image for a secondary capture.
    layers : list of ImageLayer
        Masks and explanation maps on source slices (for the SEG and the Parametric Map).
    plane_maps : list of PlaneMap
        The explanation maps on the planes the network read (in memory only).
    details : dict
        JSON-able extras (per-slice values, ROI radius, localizer confidence).
    """

    protocol: str
    protocol_version: str
    site: str
    measurements: list[Measurement]
    category: str = ""
    category_code: Code | None = None
    flags: list[str] = field(default_factory=list)
    roi: RoiGeometry | None = None
    z_extent_mm: tuple[float, float] | None = None
    site_code: Code | None = None
    study_uid: str = ""
    series_uid: str = ""
    referenced_sop_instance_uids: list[str] = field(default_factory=list)
    overlay: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)
    layers: list[ImageLayer] = field(default_factory=list, repr=False, compare=False)
    plane_maps: list[PlaneMap] = field(default_factory=list, repr=False, compare=False)

    def measurement(self, name: str) -> Measurement:
        """Return the measurement called ``name``.

        Raises
        ------
        KeyError
            When the finding has no such measurement (the message lists them).
        """
        for m in self.measurements:
            if m.name == name:
                return m
        raise KeyError(f"finding has no measurement {name!r}; it has "
                       f"{', '.join(m.name for m in self.measurements)}")

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "Finding":
        """A finding rebuilt from :meth:`to_record` (no ROI geometry, overlay or site code): enough
        to combine stored findings again (:func:`screener.study_result.study_result`)."""
        return cls(protocol=str(rec.get("protocol", "")), protocol_version=str(rec.get("protocol_version", "")),
                   site=str(rec.get("site", "")),
                   measurements=[Measurement.from_record(m) for m in rec.get("measurements", [])],
                   category=str(rec.get("category", "") or ""), flags=list(rec.get("flags", [])),
                   study_uid=str(rec.get("study_uid", "")), series_uid=str(rec.get("series_uid", "")),
                   details=dict(rec.get("details") or {}))

    def to_record(self) -> dict[str, Any]:
        """JSON-able record, as stored in the database and exported by ``screener results``.

        Keys: ``study_uid``, ``series_uid``, ``protocol``, ``protocol_version``,
        ``site``, ``category``, ``flags``, ``measurements`` (``name``, ``value``,
        ``unit``, ``code``), ``z_extent_mm`` (``[inferior, superior]`` or None),
        ``roi_center_mm`` (``[x, y, z]`` or None), ``roi_area_mm2``,
        ``roi_source_sop_instance_uid``, ``roi_source_frame_number``,
        ``referenced_sop_instance_uids`` and ``details``.
        """
        roi = self.roi
        return {
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "protocol": self.protocol,
            "protocol_version": self.protocol_version,
            "site": self.site,
            "category": self.category,
            "flags": list(self.flags),
            "measurements": [m.to_record() for m in self.measurements],
            "z_extent_mm": ([float(self.z_extent_mm[0]), float(self.z_extent_mm[1])]
                            if self.z_extent_mm is not None else None),
            "roi_center_mm": [float(v) for v in roi.centre_mm] if roi is not None else None,
            "roi_area_mm2": float(roi.area_mm2) if roi is not None else None,
            "roi_source_sop_instance_uid": roi.source_sop_instance_uid if roi is not None else None,
            "roi_source_frame_number": roi.frame_number if roi is not None else None,
            "referenced_sop_instance_uids": list(self.referenced_sop_instance_uids),
            "details": to_jsonable(self.details),
        }
