"""TID 1500 measurement reports (Comprehensive SR, SOP class .88.33) from findings.

:func:`build_sr` is generic.  The first measurement group is the study-level
screening result (:mod:`screener.study_result`), the second the protocol
coverage (every protocol the router considered: measured, or not measured and
why), then the findings of ANY protocol, one measurement group each --

* TID 1410 (planar ROI) when the finding has an ROI: the ROI is a closed
  POLYLINE SCOORD on its source slice, so OHIF draws it;
* TID 1501 (no geometry) otherwise (patient-level results, later protocols);

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
from screener.findings import Finding, Measurement
from screener.reporting import codes
from screener.radiograph import PROJECTION_MODALITIES, detector_pixel_spacing_mm, patient_orientation
from screener.reporting.sc import demographic_problems, fix_type2
from screener.study_result import StudyResult, study_result

#: stable UID of the screener as an observer device (same for every report)
DEVICE_UID = generate_uid(entropy_srcs=["screener", "observer-device", "v1"])
DEVICE_NAME = "screener"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _cc(code: Code) -> CodedConcept:
    return CodedConcept(value=code.value, scheme_designator=code.scheme_designator,
                        meaning=code.meaning)


#: caveats that qualify one kind of measurement: (how the caveat starts, lower case; what the
#: measurement's name holds); every other flag qualifies the whole finding
_CAVEAT_TARGETS: tuple[tuple[str, str], ...] = (
    ("vbmd is an estimate", "vBMD"),
    ("tbs ", "TBS"),
    ("%yam", "%YAM"),
)

#: protocol -> what it measures, in words (coverage lines)
PROTOCOL_WORDS: dict[str, str] = {
    "l1_attenuation": "L1 attenuation (CT)",
    "l1_axial": "L1 BMD estimate from CT",
    "lumbar_sagittal": "L1-L4 BMD and TBS estimate from CT",
    "femur_coronal": "femur WHO class from CT",
    "hip_xray": "femoral neck BMD from a hip radiograph",
    "dxa_spine": "DXA spine image checks",
}


def _text(name: Code, value: str, rel: str = "CONTAINS") -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value[:1024],
                                 relationship_type=getattr(hd.sr.RelationshipTypeValues,
                                                           rel.replace(" ", "_")))


def _laterality(finding: Finding) -> Code | None:
    """Left / right of a finding from its site label or its ``details["side"]``."""
    site = finding.site.lower()
    side = str(finding.details.get("side") or "").upper()
    if site.startswith("right ") or side == "R":
        return codes.RIGHT
    if site.startswith("left ") or side == "L":
        return codes.LEFT
    return None


def _caveat_split(finding: Finding) -> tuple[list[str], dict[int, list[str]]]:
    """The finding's flags that stay with the group, and those that go to one measurement (by index)."""
    group: list[str] = []
    per: dict[int, list[str]] = {i: list(m.caveats) for i, m in enumerate(finding.measurements)}
    for text in finding.flags:
        low = text.lower()
        target = next((what for start, what in _CAVEAT_TARGETS if low.startswith(start)), None)
        hits = [i for i, m in enumerate(finding.measurements) if target and target in m.name]
        if hits:
            for i in hits:
                per[i].append(text)
        else:
            group.append(text)
    return group, per


def _modality(finding: Finding, sources: dict[str, Dataset]) -> str:
    for u in ([finding.roi.source_sop_instance_uid] if finding.roi is not None else []) + \
            list(finding.referenced_sop_instance_uids):
        if u in sources:
            return str(sources[u].get("Modality", "") or "").strip().upper()
    return ""


#: concepts that a model estimates (they get an "estimated by algorithm from ..." method)
_ESTIMATED = {codes.ABMD_ESTIMATE.value, codes.TSCORE_ESTIMATE.value, codes.TBS.value,
              codes.YAM_PERCENT.value, *(c.value for c in codes.PROBABILITY_OF.values())}


def _method(m: Measurement, finding: Finding, modality: str) -> Code | None:
    if m.method is not None:
        return m.method
    if m.concept.value not in _ESTIMATED:
        return None
    try:
        return codes.method_for_modality(modality, dxa_image=finding.protocol == "dxa_spine")
    except KeyError:
        return None


def _properties(m: Measurement) -> hd.sr.MeasurementProperties | None:
    """TID 300 properties: the T-score reference (TID 311 population mean / SD, description,
    authority) and the prediction interval (upper / lower measurement uncertainty)."""
    kw: dict = {}
    if m.reference:
        ref = m.reference
        unit = _cc(Code(str(ref.get("unit", "g/cm2")), "UCUM", str(ref.get("unit", "g/cm2"))))
        values = [hd.sr.NumContentItem(name=_cc(codes.MEAN), value=float(ref["mean"]), unit=unit,
                                       relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES),
                  hd.sr.NumContentItem(name=_cc(codes.STANDARD_DEVIATION), value=float(ref["sd"]), unit=unit,
                                       relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES)]
        desc = str(ref.get("population", ""))
        if ref.get("sex_used"):
            desc += f" (sex: {ref['sex_used']})"
        kw["measurement_statistical_properties"] = hd.sr.MeasurementStatisticalProperties(
            values=values, description=f"T-score reference: {desc}"[:1024],
            authority=str(ref.get("source", ""))[:1024] or None)
    if m.interval is not None:
        lo, hi = float(m.interval[0]), float(m.interval[1])
        kw["upper_measurement_uncertainty"] = max(hi - float(m.value), 0.0)
        kw["lower_measurement_uncertainty"] = max(float(m.value) - lo, 0.0)
    return hd.sr.MeasurementProperties(**kw) if kw else None


#: TID 311 upper / lower measurement uncertainty (highdicom writes them with unit "1")
_UNCERTAINTY = {"371886008", "371885007"}


def _uncertainty_units(num: Dataset, m: Measurement) -> None:
    """Give the interval half-widths under ``num`` the measurement's own unit."""
    for child in num.get("ContentSequence") or []:
        if child.ValueType == "NUM" and child.ConceptNameCodeSequence[0].CodeValue in _UNCERTAINTY:
            unit = child.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
            unit.CodeValue, unit.CodeMeaning = m.unit, m.unit_meaning or m.unit


def _measurement_notes(m: Measurement, caveats: Sequence[str]) -> list[Dataset]:
    """TEXT (and coded caveat) items that qualify one NUM item (HAS PROPERTIES)."""
    out: list[Dataset] = []
    if m.reference:
        from screener.references import describe
        out.append(_text(pcodes.DCM.Comment, f"T-score reference: {describe(m.reference)} "
                                             f"({m.reference.get('source', '')})", "HAS PROPERTIES"))
    if m.interval is not None:
        out.append(_text(_cc(codes.PREDICTION_INTERVAL),
                         f"{100 * m.interval_level:.0f} % prediction interval {m.interval[0]:.4g} to "
                         f"{m.interval[1]:.4g} {m.unit if m.unit != '1' else ''}".rstrip()
                         + (f" ({m.interval_method})" if m.interval_method else ""), "HAS PROPERTIES"))
    for text in caveats:
        code = codes.flag_code(text)
        if code is not None:
            out.append(hd.sr.CodeContentItem(name=_cc(codes.FLAG), value=_cc(code),
                                             relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES))
        out.append(_text(pcodes.DCM.Comment, text, "HAS PROPERTIES"))
    return out


def algorithm(finding: Finding) -> hd.sr.AlgorithmIdentification:
    """TID 4019 of the code that produced ``finding``: for a model protocol the bundle that ran
    (name ``screener <protocol> model bundle <bundle>``, version = the bundle's version)."""
    d = finding.details
    params = [f"model bundle {d['bundle_id']}"] if d.get("bundle_id") else []
    if d.get("training_data"):
        params.append(f"trained on: {d['training_data']}"[:1024])
    if d.get("bundle_id"):
        name = f"screener {finding.protocol} model bundle {str(d['bundle_id']).split('@')[0]}"
        version = str(d.get("bundle_version") or str(d["bundle_id"]).partition("@")[2] or finding.protocol_version)
    else:
        name, version = f"screener {finding.protocol}", finding.protocol_version
    return hd.sr.AlgorithmIdentification(name=name[:64], version=version[:64], parameters=params or None)


def _group(finding: Finding, sources: dict[str, Dataset], notes: Sequence[str] = ()
           ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | \
        hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1410 (with ROI) or TID 1501 (without) measurement group for ``finding``."""
    algo = algorithm(finding)
    tracking = hd.sr.TrackingIdentifier(uid=generate_uid(),
                                        identifier=f"{finding.site} {finding.protocol}"[:64])
    lat = _laterality(finding)
    sites = [hd.sr.FindingSite(anatomic_location=_cc(finding.site_code),
                               laterality=_cc(lat) if lat is not None else None)] \
        if finding.site_code is not None else None
    modality = _modality(finding, sources)
    group_flags, per = _caveat_split(finding)
    measurements = []
    for m in finding.measurements:
        method = _method(m, finding, modality)
        measurements.append(hd.sr.Measurement(
            name=_cc(m.concept), value=float(m.value), unit=_cc(m.unit_code()),
            derivation=_cc(m.derivation) if m.derivation is not None else None,
            method=_cc(method) if method is not None else None,
            properties=_properties(m), algorithm_id=algo))
    evaluations = []
    if finding.category:
        value = finding.category_code or codes.category_code(finding.category)
        evaluations.append(hd.sr.QualitativeEvaluation(name=_cc(codes.CATEGORY), value=_cc(value)))
    seen: list[Code] = []
    for text in group_flags:
        fc = codes.flag_code(text)
        if fc is not None and fc not in seen:
            seen.append(fc)
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
    nums = [item for item in container.ContentSequence if item.ValueType == "NUM"]
    for i, (num, m) in enumerate(zip(nums, finding.measurements)):
        _uncertainty_units(num, m)
        extra = _measurement_notes(m, per.get(i, []))
        if extra:
            if "ContentSequence" not in num:
                num.ContentSequence = []
            num.ContentSequence.extend(extra)
    for text in [*group_flags, *(f"source header: {n}" for n in notes)]:
        container.ContentSequence.append(_text(pcodes.DCM.Comment, text))
    return group


def study_group(result: StudyResult) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The study-level result as the FIRST measurement group (TID 1501): the category as a coded
    evaluation, the agreement, each contributing measurement with its method, and the rule."""
    code = codes.STUDY_CATEGORIES[result.category]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Study screening result"),
        finding_type=_cc(codes.FINDING_TYPE_BONE),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=_cc(codes.STUDY_RESULT), value=_cc(code)),
            hd.sr.QualitativeEvaluation(name=_cc(codes.INTENDED_USE), value=_cc(codes.NOT_FOR_DIAGNOSTIC_USE))])
    seq = group[0].ContentSequence
    seq.append(_text(_cc(codes.STUDY_RESULT),
                     f"Study result: {result.category.replace(chr(0x2014), '-')}; {result.agreement}"))
    for c in result.contributions:
        seq.append(_text(_cc(codes.CONTRIBUTING), c.line()))
    for n in result.notes:
        seq.append(_text(pcodes.DCM.Comment, n))
    seq.append(_text(_cc(codes.STUDY_RULE),
                     "Rule (docs/study-result.md): measured L1 attenuation first, then model estimates by "
                     "validated accuracy; methods whose uncertainty ranges do not overlap give "
                     "'discordant - review' and no grade"))
    return group


def coverage_group(decisions: Sequence[tuple[str, bool, str]]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Every protocol the router considered: measured, or not measured with the reason in words
    (one coded outcome per protocol, then one TEXT line per protocol, in the same order)."""
    evaluations = [hd.sr.QualitativeEvaluation(
        name=_cc(codes.PROTOCOL_OUTCOME), value=_cc(codes.PROTOCOL_RAN if ran else codes.PROTOCOL_NOT_RUN))
        for _, ran, _ in decisions]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Protocol coverage"),
        qualitative_evaluations=evaluations)
    for line in coverage_lines(decisions):
        group[0].ContentSequence.append(_text(_cc(codes.PROTOCOL_OUTCOME), line))
    return group


def coverage_lines(decisions: Sequence[tuple[str, bool, str]]) -> list[str]:
    """``"<what> (<protocol>): measured"`` or ``"<what> (<protocol>) not measured: <reason>"``."""
    out = []
    for name, ran, reason in decisions:
        what = PROTOCOL_WORDS.get(name, name)
        out.append(f"{what} ({name}): measured" if ran else f"{what} ({name}) not measured: {reason}")
    return out


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
             institution_name: str | None = None,
             decisions: Sequence[tuple[str, bool, str]] | None = None,
             result: StudyResult | None = None) -> Dataset:
    """Build a TID 1500 Comprehensive SR of ``findings``.

    The Imaging Measurements container holds, in this order: the study-level screening result
    (:func:`study_group`), the protocol coverage when ``decisions`` are given
    (:func:`coverage_group`), then one group per finding.

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
    result = result if result is not None else study_result(findings)
    groups = [study_group(result)]
    if decisions:
        groups.append(coverage_group(decisions))
    groups += [_group(f, by_uid, notes) for f in findings]
    is_ct = any(str(ds.get("Modality", "")).strip().upper() == "CT" for ds in evidence)
    procedures = ([_cc(codes.PROCEDURE_CT)] if is_ct else []) + [_cc(codes.PROCEDURE_BONE_DENSITY)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedures, imaging_measurements=groups,
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
