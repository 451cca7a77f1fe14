"""TID 1500 measurement reports (Comprehensive SR, SOP class .88.33) from findings.

:func:`build_sr` is generic: it turns the findings of ANY protocol into one
measurement group each --

* TID 1410 (planar ROI) when the finding has an ROI: the ROI is a closed
  POLYLINE SCOORD on its source slice, so OHIF draws it;
* TID 1501 (no geometry) otherwise (patient-level results, later protocols);

with a tracking identifier and UID, finding type Bone, the finding site,
algorithm identification (TID 4019, also on every measurement so each has a
child item), the measurements with UCUM units, the category as a coded
qualitative evaluation, the caveat flags as coded evaluations (known kinds)
and as TEXT comments, and a coded "Not for diagnostic use without review"
evaluation. The document carries observation context (device observer with
a stable UID), procedure reported (LN CT unspecified body region + SCT bone
density scan), an Image Library of the referenced slices, the source study's
patient/study modules, and ``PredecessorDocumentsSequence`` when it
supersedes an earlier SR (dicom-sr.md).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from screener import __version__
from screener.findings import Finding
from screener.reporting import codes
from screener.radiograph import PROJECTION_MODALITIES, detector_pixel_spacing_mm, patient_orientation
from screener.reporting.sc import demographic_problems, fix_type2

#: stable UID of the screener as an observer device (same for every report)
DEVICE_UID = generate_uid(entropy_srcs=["screener", "observer-device", "v1"])
DEVICE_NAME = "screener"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _cc(code: Code) -> CodedConcept:
    return CodedConcept(value=code.value, scheme_designator=code.scheme_designator,
                        meaning=code.meaning)


def _flag_codes(flags: Sequence[str]) -> list[Code]:
    out = []
    for f in flags:
        low = f.lower()
        key = ("contrast" if low.startswith("contrast") else
               "kvp" if low.startswith("kvp") else
               "risk135" if "135 hu" in low else
               "roi_shrunk" if low.startswith("roi shrunk") else
               "level_uncertain" if "level label uncertain" in low else
               "estimate" if "estimate" in low else None)
        if key and codes.FLAG_CODES[key] not in out:
            out.append(codes.FLAG_CODES[key])
    return out


def _group(finding: Finding, sources: dict[str, Dataset], notes: Sequence[str] = ()
           ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | \
        hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1410 (with ROI) or TID 1501 (without) measurement group for ``finding``."""
    params = [f"model bundle {finding.details['bundle_id']}"] if finding.details.get("bundle_id") else []
    if finding.details.get("training_data"):
        params.append(f"trained on: {finding.details['training_data']}"[:1024])
    algo = hd.sr.AlgorithmIdentification(name=f"screener {finding.protocol}",
                                         version=finding.protocol_version, parameters=params or None)
    tracking = hd.sr.TrackingIdentifier(uid=generate_uid(),
                                        identifier=f"{finding.site} {finding.protocol}"[:64])
    sites = [hd.sr.FindingSite(anatomic_location=_cc(finding.site_code))] \
        if finding.site_code is not None else None
    measurements = [
        hd.sr.Measurement(name=_cc(m.concept), value=float(m.value), unit=_cc(m.unit_code()),
                          derivation=_cc(m.derivation) if m.derivation is not None else None,
                          method=_cc(m.method) if m.method is not None else None,
                          algorithm_id=algo)
        for m in finding.measurements]
    evaluations = []
    if finding.category:
        value = finding.category_code or codes.category_code(finding.category)
        evaluations.append(hd.sr.QualitativeEvaluation(name=_cc(codes.CATEGORY), value=_cc(value)))
    for fc in _flag_codes(finding.flags):
        evaluations.append(hd.sr.QualitativeEvaluation(name=_cc(codes.FLAG), value=_cc(fc)))
    evaluations.append(hd.sr.QualitativeEvaluation(name=_cc(codes.INTENDED_USE),
                                                   value=_cc(codes.NOT_FOR_DIAGNOSTIC_USE)))
    common = dict(tracking_identifier=tracking, finding_type=_cc(codes.FINDING_TYPE_BONE),
                  algorithm_id=algo, finding_sites=sites, measurements=measurements or None,
                  qualitative_evaluations=evaluations)
    if finding.roi is not None:
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
    for text in [*finding.flags, *(f"source header: {n}" for n in notes)]:
        container.ContentSequence.append(hd.sr.TextContentItem(
            name=pcodes.DCM.Comment, value=text[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


#: TID 1603 descriptors of a projection image that its header may not state
_ORIENTATION_DESCRIPTORS = frozenset({pcodes.DCM.PatientOrientationRow.value,
                                      pcodes.DCM.PatientOrientationColumn.value})
_SPACING_DESCRIPTORS = frozenset({pcodes.DCM.HorizontalPixelSpacing.value, pcodes.DCM.VerticalPixelSpacing.value})
#: stand-ins that let highdicom build a projection image's entry; the descriptors made from them
#: are removed again (:func:`_drop_descriptors`), so a report never states them
_STAND_IN_ORIENTATION, _STAND_IN_SPACING = ["L", "F"], ["1", "1"]


def library_image(ds: Dataset) -> tuple[Dataset, frozenset[str]]:
    """A deep copy of a source header that highdicom's Image Library (TID 1601-1603) can describe.

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
        The copy, and the code values of the TID 1603 descriptors to leave out of its entry
        (:func:`_drop_descriptors`).
    """
    out = copy.deepcopy(ds)
    if str(out.get("Modality", "") or "").strip().upper() not in PROJECTION_MODALITIES:
        return out, frozenset()
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


def build_sr(findings: Sequence[Finding], sources: Sequence[Dataset], *,
             series_uid: str | None = None, sop_instance_uid: str | None = None,
             series_number: int = 901, instance_number: int = 1,
             previous: Dataset | None = None, manufacturer: str = "screener",
             institution_name: str | None = None) -> Dataset:
    """Build a TID 1500 Comprehensive SR of ``findings``.

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
    by_uid = {str(ds.SOPInstanceUID): fix_type2(ds) for ds in sources}
    notes = sorted({n for ds in sources for n in demographic_problems(ds).values()})
    wanted: list[str] = []
    for f in findings:
        uids = ([f.roi.source_sop_instance_uid] if f.roi is not None else []) + \
            list(f.referenced_sop_instance_uids)
        for u in uids:
            if u not in by_uid:
                raise ValueError(f"finding {f.protocol}/{f.site} references instance {u} that is "
                                 "not among the source datasets given to build_sr")
            if u not in wanted:
                wanted.append(u)
    if not wanted:
        wanted = [next(iter(by_uid))]
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
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=[_cc(codes.PROCEDURE_CT), _cc(codes.PROCEDURE_BONE_DENSITY)],
        imaging_measurements=[_group(f, by_uid, notes) for f in findings],
        referenced_images=[ds for ds, _ in library])
    _drop_descriptors(report[0], {str(ds.SOPInstanceUID): drop for ds, drop in library if drop})
    kwargs = {}
    if institution_name:
        kwargs["institution_name"] = institution_name
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence, content=report[0],
        series_instance_uid=series_uid or generate_uid(), series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=instance_number,
        manufacturer=manufacturer, is_complete=True, is_final=False, is_verified=False,
        previous_versions=[previous] if previous is not None else None,
        series_description="Bone density screening SR (not for diagnosis w/o review)",
        software_versions=f"screener {__version__}",
        coding_schemes=[CodingSchemeIdentificationItem(designator=codes.SCHEME,
                                                       name=codes.SCHEME_NAME)],
        **kwargs)
    return sr


def write_sr(sr: Dataset, out_dir: Path) -> Path:
    """Write ``sr`` to ``out_dir/<SOPInstanceUID>.dcm`` (0600, folder 0700: it holds the
    patient's name and ID); returns the path."""
    from screener.reporting.sc import write_private
    return write_private(sr, out_dir)
