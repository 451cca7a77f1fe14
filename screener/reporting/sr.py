"""TID 1500 measurement reports (Comprehensive SR, SOP class .88.33) from findings.

:func:`build_sr` is generic (content items: :mod:`.content`).  The Imaging Measurements hold the
findings of ANY protocol, one measurement group each, every one drawn on an image so that stock
OHIF 3.13 displays it (docs/sr.md, "What OHIF shows") --

* TID 1410 (planar ROI) when the finding has an ROI on the image the model measured: a closed
  POLYLINE SCOORD on its source slice;
* TID 1501 whose measurements are INFERRED FROM a SCOORD POINT at the measured structure's
  centre on the axial slice through it: per-vertebra values, and protocols that read
  sagittal reformats (their axial ROI is only a slab's footprint);

with a tracking identifier and UID, finding type Bone, the finding site,
finding-site laterality (left / right), algorithm identification (TID 4019:
the model bundle that ran; also on every measurement so each has a child
item), the measurements with UCUM units -- model estimates with an
"estimated by algorithm from CT / radiograph" method and never a DXA LOINC
code, T-scores with their reference population (TID 311 mean, SD,
description, authority), prediction intervals as measurement uncertainty --,
caveats under the measurement they qualify (the rest under the group), the
category as a coded qualitative evaluation, coded caveat flags (known kinds)
and a coded "Not for diagnostic use without review" evaluation. The document carries observation context (device observer with
a stable UID), procedure reported (LN CT unspecified body region for CT, SCT bone
density scan), an Image Library of the referenced slices, TID 1500's Qualitative Evaluations
with the study-level screening result (:mod:`screener.study_result`) and the protocol coverage
(every protocol the router considered: measured, or not measured and why), the source study's
patient/study modules, and ``PredecessorDocumentsSequence`` when it
supersedes an earlier SR (dicom-sr.md).
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Sequence

import highdicom as hd
import highdicom.sr.content as _hd_sr_content
import highdicom.sr.templates as _hd_sr_templates
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from screener import __version__
from screener.findings import Finding
from screener.radiograph import PROJECTION_MODALITIES, detector_pixel_spacing_mm, patient_orientation
from screener.reporting import codes
from screener.reporting.content import (algorithm, caveat_split, cc, fix_uncertainty_units, laterality,
                                        measurement_notes, method_of, properties_of,
                                        qualitative_evaluations, source_modality, text_item)
from screener.reporting.sc import demographic_problems, fix_type2
from screener.study_result import StudyResult, study_result

def _iod_has_attribute(attribute: str, sop_class_uid: str,
                       exclude_path_elements: Sequence[str] | None = None) -> bool:
    """``highdicom``'s ``is_attribute_in_iod``, remembered per (attribute, SOP class, excluded
    path elements): it scans every attribute of every module of the IOD on each call (highdicom
    asks it once per image region of the report, 0.1 s of a report's 0.25 s), and its answer
    depends on highdicom's tables of the standard only."""
    key = tuple(exclude_path_elements) if exclude_path_elements is not None else None
    return _iod_has_attribute_cached(attribute, str(sop_class_uid), key)


@functools.lru_cache(maxsize=1024)
def _iod_has_attribute_cached(attribute: str, sop_class_uid: str,
                              exclude: tuple[str, ...] | None) -> bool:
    return _is_attribute_in_iod(attribute, sop_class_uid,
                                list(exclude) if exclude is not None else None)


_is_attribute_in_iod = _hd_sr_content.is_attribute_in_iod
_hd_sr_content.is_attribute_in_iod = _iod_has_attribute
# the Image Library asks, per referenced image, whether its IOD has pixel data (three such scans)
_hd_sr_templates.does_iod_have_pixel_data = functools.lru_cache(maxsize=256)(
    _hd_sr_templates.does_iod_have_pixel_data)


class _ComprehensiveSR(hd.sr.ComprehensiveSR):
    """highdicom's Comprehensive SR whose ``.content`` (the content tree parsed into highdicom's
    content items) is parsed when first asked for, from the document's own tree: the daemon
    writes the document and never reads it back (the parse was 0.15 s of a 300-slice CT's
    report). The dataset, and ``.content`` when read, are what highdicom's constructor gives."""

    @property
    def content(self) -> "hd.sr.value_types.ContentSequence":
        """The document's content tree as highdicom content items (parsed on first use)."""
        if self._content is None:
            from highdicom.sr.value_types import ContentItem, ContentSequence
            self._content = ContentSequence(
                [ContentItem._from_dataset_derived(self._content_tree)], is_root=True)
            self._content_tree = None
        return self._content


#: stable UID of the screener as an observer device (same for every report)
DEVICE_UID = generate_uid(entropy_srcs=["screener", "observer-device", "v1"])
DEVICE_NAME = "screener"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


#: protocols whose model reads sagittal reformats (mid-vertebral slabs of L1-L4): their axial ROI
#: is only a slab's footprint (a bar 5 mm wide from the front of the abdomen to the back), so the SR
#: marks the measured structure's centre as a POINT on the axial slice through it.  femur_coronal
#: keeps its ROI: the footprint of its coronal crops is a line through both femoral heads, on bone.
REFORMAT_PROTOCOLS = frozenset({"lumbar_sagittal"})


def _plane(ds: Dataset, frame: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Position, row and column direction cosines and (row, column) spacing of an image (or of
    ``frame`` of a multi-frame image); ``None`` when the header has no plane geometry."""
    ipp, iop, ps = (ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                    ds.get("PixelSpacing"))
    if (ipp is None or iop is None or ps is None) and "PerFrameFunctionalGroupsSequence" in ds:
        groups = [g for g in (ds.PerFrameFunctionalGroupsSequence[(frame or 1) - 1],
                              (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0])]

        def find(seq: str, kw: str):  # noqa: ANN202 - a DICOM value
            for g in groups:
                if seq in g and g[seq].value and kw in g[seq][0]:
                    return g[seq][0].get(kw)
            return None
        ipp = ipp if ipp is not None else find("PlanePositionSequence", "ImagePositionPatient")
        iop = iop if iop is not None else find("PlaneOrientationSequence", "ImageOrientationPatient")
        ps = ps if ps is not None else find("PixelMeasuresSequence", "PixelSpacing")
    if ipp is None or iop is None or ps is None or len(iop) != 6 or len(ps) != 2:
        return None
    iop_a = np.asarray([float(v) for v in iop])
    return (np.asarray([float(v) for v in ipp]), iop_a[:3], iop_a[3:], np.asarray([float(v) for v in ps]))


def point_on_image(ds: Dataset, point_mm: Sequence[float], frame: int | None = None) -> np.ndarray | None:
    """SCOORD image coordinates ``(column, row)`` of a patient point (LPS mm) projected onto the
    plane of ``ds`` (clipped to the image); ``None`` when the header has no plane geometry."""
    plane = _plane(ds, frame)
    if plane is None:
        return None
    ipp, row_dir, col_dir, (dr, dc) = plane
    d = np.asarray(point_mm, dtype=float) - ipp
    col = float(np.dot(d, row_dir)) / dc + 0.5
    row = float(np.dot(d, col_dir)) / dr + 0.5
    cols, rows = int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
    if cols and rows:
        col, row = float(np.clip(col, 0.0, cols)), float(np.clip(row, 0.0, rows))
    return np.array([[col, row]])


def _centre_point(finding: Finding, sources: dict[str, Dataset]
                  ) -> tuple[Dataset, int | None, np.ndarray] | None:
    """The image, frame and SCOORD POINT at the centre of the structure a finding measured: its
    ``details["centroid_mm"]`` on its first referenced image, else its ROI's centre on the ROI's
    image; ``None`` when neither is known or the image has no plane geometry."""
    centre = finding.details.get("centroid_mm")
    if centre is not None:
        uid = next((u for u in finding.referenced_sop_instance_uids if u in sources), None)
        frame = None
    elif finding.roi is not None:
        centre, uid, frame = finding.roi.centre_mm, finding.roi.source_sop_instance_uid, finding.roi.frame_number
    else:
        return None
    if uid is None or uid not in sources:
        return None
    point = point_on_image(sources[uid], centre, frame)
    return (sources[uid], frame, point) if point is not None else None


def _group(finding: Finding, sources: dict[str, Dataset], notes: Sequence[str] = ()
           ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | \
        hd.sr.MeasurementsAndQualitativeEvaluations:
    """One measurement group for ``finding``, drawn on its image where the image allows:

    * TID 1410 with the ROI as a closed POLYLINE on its source slice when the finding has an ROI
      on the image the model measured;
    * TID 1501 whose measurements are each INFERRED FROM a SCOORD POINT at the structure's centre
      on the axial slice through it, for a per-vertebra value (``details["centroid_mm"]``) and for
      a protocol that reads reformats (:data:`REFORMAT_PROTOCOLS`);
    * TID 1501 with image references only when there is no geometry at all (OHIF 3.13 cannot
      display such a group; every shipped protocol gives geometry).
    """
    algo = algorithm(finding)
    tracking = hd.sr.TrackingIdentifier(uid=generate_uid(),
                                        identifier=f"{finding.site} {finding.protocol}"[:64])
    lat = laterality(finding)
    sites = [hd.sr.FindingSite(anatomic_location=cc(finding.site_code),
                               laterality=cc(lat) if lat is not None else None)] \
        if finding.site_code is not None else None
    modality = source_modality(finding, sources)
    group_flags, per = caveat_split(finding)
    polyline = finding.roi is not None and finding.protocol not in REFORMAT_PROTOCOLS
    centre = None if polyline else _centre_point(finding, sources)
    inferred_from = None
    if centre is not None:
        src, frame, point = centre
        inferred_from = [hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POINT, graphic_data=point,
            source_image=hd.sr.SourceImageForRegion.from_source_image(
                src, referenced_frame_numbers=[frame] if frame else None))]
    measurements = []
    for m in finding.measurements:
        method = method_of(m, finding, modality)
        name, derivation = codes.sr_concept(m.concept, m.derivation)
        measurements.append(hd.sr.Measurement(
            name=cc(name), value=float(m.value), unit=cc(m.unit_code()),
            derivation=cc(derivation) if derivation is not None else None,
            method=cc(method) if method is not None else None,
            properties=properties_of(m), algorithm_id=algo, referenced_coordinates=inferred_from))
    evaluations = []
    if finding.category:
        value = finding.category_code or codes.category_code(finding.category)
        evaluations.append(hd.sr.QualitativeEvaluation(name=cc(codes.CATEGORY), value=cc(value)))
    seen: list[Code] = []
    for text in group_flags:
        fc = codes.flag_code(text)
        if fc is not None and fc not in seen:
            seen.append(fc)
            evaluations.append(hd.sr.QualitativeEvaluation(name=cc(codes.FLAG), value=cc(fc)))
    evaluations.append(hd.sr.QualitativeEvaluation(name=cc(codes.INTENDED_USE),
                                                   value=cc(codes.NOT_FOR_DIAGNOSTIC_USE)))
    common = dict(tracking_identifier=tracking, finding_type=cc(codes.FINDING_TYPE_BONE),
                  algorithm_id=algo, finding_sites=sites, measurements=measurements or None,
                  qualitative_evaluations=evaluations)
    if polyline:
        assert finding.roi is not None
        src = sources[finding.roi.source_sop_instance_uid]
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.asarray(finding.roi.polygon, dtype=float),
            source_image=hd.sr.SourceImageForRegion.from_source_image(
                src, referenced_frame_numbers=[finding.roi.frame_number]
                if finding.roi.frame_number else None))
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region,
                                                                     **common)
    else:
        refs = [hd.sr.SourceImageForMeasurementGroup.from_source_image(sources[u])
                for u in finding.referenced_sop_instance_uids if u in sources]
        group = hd.sr.MeasurementsAndQualitativeEvaluations(source_images=refs or None, **common)
    container = group[0]
    nums = [item for item in container.ContentSequence if item.ValueType == "NUM"]
    for i, (num, m) in enumerate(zip(nums, finding.measurements)):
        fix_uncertainty_units(num, m)
        extra = measurement_notes(m, per.get(i, []))
        if extra:
            if "ContentSequence" not in num:
                num.ContentSequence = []
            num.ContentSequence.extend(extra)
    # the finding's caveats as "Screening caveat" TEXT (not DCM Comment: OHIF prints every group-level
    # Comment of a group without a planar ROI into the viewport, over the values)
    for text in group_flags:
        container.ContentSequence.append(text_item(cc(codes.FLAG), text))
    for n in notes:
        container.ContentSequence.append(text_item(pcodes.DCM.Comment, f"source header: {n}"))
    return group



#: TID 1603 descriptors of a projection image that its header may not state
_ORIENTATION_DESCRIPTORS = frozenset({pcodes.DCM.PatientOrientationRow.value,
                                      pcodes.DCM.PatientOrientationColumn.value})
_SPACING_DESCRIPTORS = frozenset({pcodes.DCM.HorizontalPixelSpacing.value, pcodes.DCM.VerticalPixelSpacing.value})
#: stand-ins that let highdicom build a projection image's entry; the descriptors made from them
#: are removed again (:func:`_drop_descriptors`), so a report never states them
_STAND_IN_ORIENTATION, _STAND_IN_SPACING = ["L", "F"], ["1", "1"]


def library_image(ds: Dataset) -> tuple[Dataset, frozenset[str]]:
    """A source header that highdicom's Image Library (TID 1601-1603) can describe: ``ds`` itself for
    a cross-sectional image (CT, MR, ...), else a deep copy of it (a projection image's).

    highdicom reads ``ImagerPixelSpacing`` and two ``PatientOrientation`` values from every
    projection image (CR, DX, MG, ...).  When ``ImagerPixelSpacing`` is absent or unusable the copy
    gets the detector-plane spacing the image's other attributes give
    (:func:`screener.radiograph.detector_pixel_spacing_mm`: ``PixelSpacing`` times the
    magnification factor).  What the header does not state at all (no usable spacing; an absent,
    empty or malformed ``PatientOrientation``) gets a stand-in so that highdicom can build the
    entry, and its descriptors are named for removal: the report never states what the source does
    not.  ``ds`` itself is never changed.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A source image header.

    Returns
    -------
    (pydicom.dataset.Dataset, frozenset of str)
        The header (or its copy), and the code values of the TID 1603 descriptors to leave out of its entry
        (:func:`_drop_descriptors`).
    """
    if str(ds.get("Modality", "") or "").strip().upper() not in PROJECTION_MODALITIES:
        return ds, frozenset()  # nothing to add: highdicom only reads it (no copy needed)
    out = copy.deepcopy(ds)
    leave_out: frozenset[str] = frozenset()
    spacing = detector_pixel_spacing_mm(out)
    if spacing is None:
        leave_out |= _SPACING_DESCRIPTORS
    out.ImagerPixelSpacing = [f"{v:.6g}" for v in spacing] if spacing is not None else _STAND_IN_SPACING
    orientation = patient_orientation(out)
    if orientation is None:
        leave_out |= _ORIENTATION_DESCRIPTORS
    out.PatientOrientation = list(orientation) if orientation is not None else _STAND_IN_ORIENTATION
    return out, leave_out


def _drop_descriptors(report: Dataset, leave_out: dict[str, frozenset[str]]) -> None:
    """Remove descriptors from image library entries: ``leave_out`` maps a SOP Instance UID to
    the concept code values to remove from its entry."""
    def walk(items: Sequence[Dataset]) -> None:
        for item in items:
            refs = item.get("ReferencedSOPSequence") or []
            uid = str(refs[0].ReferencedSOPInstanceUID) if refs else ""
            if uid in leave_out and "ContentSequence" in item:
                item.ContentSequence = [
                    c for c in item.ContentSequence
                    if not (c.get("ConceptNameCodeSequence") and
                            c.ConceptNameCodeSequence[0].CodeValue in leave_out[uid])]
            elif "ContentSequence" in item:
                walk(item.ContentSequence)
    walk(report.ContentSequence)


def _comprehensive_sr(*, evidence: Sequence[Dataset], content: Dataset, **kwargs) -> hd.sr.ComprehensiveSR:
    """``highdicom.sr.ComprehensiveSR(evidence=evidence, content=content, **kwargs)``, the same
    dataset without highdicom's passes over the content tree.

    highdicom deep-copies the tree (to parse the copy into ``.content``) and walks it three times
    to validate it (every IMAGE and COMPOSITE reference among the evidence, no SCOORD3D item): a
    third of the report's cost for a few thousand items.  :func:`build_sr` has checked the
    references already (every instance a finding references is among the evidence) and writes no
    SCOORD3D, so the document is built on the content's root attributes alone, then given the
    tree as highdicom gives it (``sr[tag] = element`` for each root element) and ``.content``
    parsed from the tree itself when first read (:class:`_ComprehensiveSR`; the tree is the
    report's own, built for this document).  The evidence sequences depend on ``evidence`` only,
    so every attribute is what highdicom writes.
    """
    root = Dataset()
    for elem in content:
        if elem.keyword != "ContentSequence":
            root.add(elem)
    root.ContentSequence = []  # highdicom looks for one
    sr = hd.sr.ComprehensiveSR(evidence=evidence, content=root, **kwargs)
    for tag, value in content.items():
        sr[tag] = value
    sr.__class__ = _ComprehensiveSR  # .content parsed from ``content`` when first read
    sr._content, sr._content_tree = None, content
    return sr


def build_sr(findings: Sequence[Finding], sources: Sequence[Dataset], *,
             series_uid: str | None = None, sop_instance_uid: str | None = None,
             series_number: int = 901, instance_number: int = 1,
             previous: Dataset | None = None, manufacturer: str = "screener",
             institution_name: str | None = None,
             decisions: Sequence[tuple[str, bool, str]] | None = None,
             result: StudyResult | None = None) -> Dataset:
    """Build a TID 1500 Comprehensive SR of ``findings``.

    The Imaging Measurements container holds one measurement group per finding, each drawn on
    its image (:func:`_group`); the study-level screening result and the protocol coverage (when
    ``decisions`` are given) follow in TID 1500's Qualitative Evaluations
    (:func:`screener.reporting.content.qualitative_evaluations`).

    Parameters
    ----------
    findings : sequence of Finding
        At least one; from any protocol.
    sources : sequence of pydicom.dataset.Dataset
        Headers of the source images; every instance a finding references
        (ROI slice, ``referenced_sop_instance_uids``) must be among them. The
        first referenced one provides the patient and study modules (missing
        type-2 attributes are set empty on a copy).
    series_uid, sop_instance_uid : str, optional
        Generated when omitted.
    series_number, instance_number : int
    previous : pydicom.dataset.Dataset, optional
        The SR this one supersedes (listed in PredecessorDocumentsSequence).
    manufacturer, institution_name : str
    decisions : sequence of (str, bool, str), optional
        Every protocol the router considered: ``(name, ran, reason)``.
    result : StudyResult, optional
        The study-level result (default: :func:`screener.study_result.study_result` of
        ``findings``).

    Returns
    -------
    highdicom.sr.ComprehensiveSR

    Raises
    ------
    ValueError
        No findings, a referenced instance missing from ``sources``, or a
        ``previous`` SR of another study.
    """
    if not findings:
        raise ValueError("an SR needs at least one finding (TID 1500 requires a measurement group)")
    given = {str(ds.SOPInstanceUID): ds for ds in sources}
    notes = sorted({n for ds in sources for n in demographic_problems(ds).values()})
    wanted: list[str] = []
    for f in findings:
        uids = ([f.roi.source_sop_instance_uid] if f.roi is not None else []) + \
            list(f.referenced_sop_instance_uids)
        for u in uids:
            if u not in given:
                raise ValueError(f"finding {f.protocol}/{f.site} references instance {u} that is "
                                 "not among the source datasets given to build_sr")
            if u not in wanted:
                wanted.append(u)
    if not wanted:
        wanted = [next(iter(given))]
    # copies made report-ready only of the instances the report refers to (the groups look up
    # nothing else), not of every slice of the series
    by_uid = {u: fix_type2(given[u]) for u in wanted}
    evidence = [by_uid[u] for u in wanted]
    study_uid = str(evidence[0].StudyInstanceUID)
    if previous is not None and str(previous.get("StudyInstanceUID", "")) != study_uid:
        raise ValueError("the superseded SR belongs to another study "
                         f"({previous.get('StudyInstanceUID')} != {study_uid})")

    observer = hd.sr.ObserverContext(
        observer_type=pcodes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name=DEVICE_NAME, manufacturer_name=manufacturer,
            model_name="screener", ))
    library = [library_image(ds) for ds in evidence]
    result = result if result is not None else study_result(findings)
    groups = [_group(f, by_uid, notes) for f in findings]
    is_ct = any(str(ds.get("Modality", "")).strip().upper() == "CT" for ds in evidence)
    procedures = ([cc(codes.PROCEDURE_CT)] if is_ct else []) + [cc(codes.PROCEDURE_BONE_DENSITY)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedures, imaging_measurements=groups,
        referenced_images=[ds for ds, _ in library])
    _drop_descriptors(report[0], {str(ds.SOPInstanceUID): drop for ds, drop in library if drop})
    report[0].ContentSequence.append(qualitative_evaluations(result, decisions))
    kwargs = {}
    if institution_name:
        kwargs["institution_name"] = institution_name
    sr = _comprehensive_sr(
        evidence=evidence, content=report[0],
        series_instance_uid=series_uid or generate_uid(), series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=instance_number,
        manufacturer=manufacturer, is_complete=True, is_final=False, is_verified=False,
        previous_versions=[previous] if previous is not None else None,
        series_description="Bone density screening SR (not for diagnosis w/o review)",
        software_versions=f"screener {__version__}",
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=codes.SCHEME, name=codes.SCHEME_NAME,
            responsible_organization=codes.SCHEME_RESPONSIBLE)],
        **kwargs)
    return sr


def dxa_loinc_codes(sr: Dataset) -> list[str]:
    """The DXA LOINC codes (:data:`codes.DXA_LOINC_CODES`) anywhere in ``sr``'s content tree."""
    found: list[str] = []

    def walk(items: Sequence[Dataset]) -> None:
        for item in items:
            for kw in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                for c in item.get(kw) or []:
                    if str(c.get("CodingSchemeDesignator", "")) == "LN" and \
                            str(c.get("CodeValue", "")) in codes.DXA_LOINC_CODES:
                        found.append(str(c.CodeValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)
    walk([sr])
    return found


#: environment variable naming a file that :func:`write_sr` appends every written path to
#: (the test suite checks every SR it makes; unset in production)
WRITE_LOG_ENV = "SCREENER_SR_WRITE_LOG"


def write_sr(sr: Dataset, out_dir: Path) -> Path:
    """Write ``sr`` to ``out_dir/<SOPInstanceUID>.dcm`` (0600, folder 0700: it holds the
    patient's name and ID); returns the path.

    Raises
    ------
    ValueError
        When the SR codes a value with a DXA LOINC code: the screener estimates from CT and
        radiographs and never reads DXA reports, so such a code would file an estimate as a
        DXA measurement.
    """
    import os

    from screener.reporting.sc import write_private

    bad = dxa_loinc_codes(sr)
    if bad:
        raise ValueError(f"SR codes estimates with DXA LOINC code(s) {', '.join(sorted(set(bad)))}: "
                         "use codes.ABMD_ESTIMATE / TSCORE_ESTIMATE with a method")
    path = write_private(sr, out_dir)
    log_file = os.environ.get(WRITE_LOG_ENV)
    if log_file:
        with open(log_file, "a", encoding="utf-8") as fh:
            fh.write(f"{path}\n")
    return path
