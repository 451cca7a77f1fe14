"""Content items of the screener's SR (TID 1500 parts that :mod:`.sr` assembles).

* per measurement: the "estimated by algorithm from <modality>" method of a model estimate, the
  T-score reference (TID 311 population mean / SD, description, authority), the prediction
  interval (upper / lower measurement uncertainty in the measurement's unit), and the caveats
  that qualify it (HAS PROPERTIES under its NUM);
* per finding: the finding-site laterality, the caveats of the whole finding, the algorithm
  identification of the bundle that ran (TID 4019);
* per report: TID 1500's Qualitative Evaluations (:func:`qualitative_evaluations`): the
  study-level result (:func:`study_items`) and the protocol coverage (:func:`coverage_items`).

docs/sr.md lists every concept with its code, unit and why.
"""
from __future__ import annotations

from typing import Sequence

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes
from pydicom.sr.coding import Code

from screener.findings import Finding, Measurement
from screener.reporting import codes
from screener.study_result import StudyResult

__all__ = ["PROTOCOL_WORDS", "algorithm", "caveat_split", "cc", "coverage_items", "coverage_lines",
           "fix_uncertainty_units", "laterality", "measurement_notes", "method_of", "properties_of",
           "qualitative_evaluations", "source_modality", "study_items", "text_item"]


def cc(code: Code) -> CodedConcept:
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


def text_item(name: Code, value: str, rel: str = "CONTAINS") -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value[:1024],
                                 relationship_type=getattr(hd.sr.RelationshipTypeValues,
                                                           rel.replace(" ", "_")))


def laterality(finding: Finding) -> Code | None:
    """Left / right of a finding from its site label or its ``details["side"]``."""
    site = finding.site.lower()
    side = str(finding.details.get("side") or "").upper()
    if site.startswith("right ") or side == "R":
        return codes.RIGHT
    if site.startswith("left ") or side == "L":
        return codes.LEFT
    return None


def caveat_split(finding: Finding) -> tuple[list[str], dict[int, list[str]]]:
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


def source_modality(finding: Finding, sources: dict[str, Dataset]) -> str:
    for u in ([finding.roi.source_sop_instance_uid] if finding.roi is not None else []) + \
            list(finding.referenced_sop_instance_uids):
        if u in sources:
            return str(sources[u].get("Modality", "") or "").strip().upper()
    return ""


#: concepts that a model estimates (they get an "estimated by algorithm from ..." method)
_ESTIMATED = {codes.ABMD_ESTIMATE.value, codes.TSCORE_ESTIMATE.value, codes.TBS.value,
              codes.YAM_PERCENT.value, *(c.value for c in codes.PROBABILITY_OF.values())}


def method_of(m: Measurement, finding: Finding, modality: str) -> Code | None:
    if m.method is not None:
        return m.method
    if m.concept.value not in _ESTIMATED:
        return None
    try:
        return codes.method_for_modality(modality, dxa_image=finding.protocol == "dxa_spine")
    except KeyError:
        return None


def properties_of(m: Measurement) -> hd.sr.MeasurementProperties | None:
    """TID 300 properties: the T-score reference (TID 311 population mean / SD, description,
    authority) and the prediction interval (upper / lower measurement uncertainty)."""
    kw: dict = {}
    if m.reference:
        ref = m.reference
        unit = cc(Code(str(ref.get("unit", "g/cm2")), "UCUM", str(ref.get("unit", "g/cm2"))))
        values = [hd.sr.NumContentItem(name=cc(codes.MEAN), value=float(ref["mean"]), unit=unit,
                                       relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES),
                  hd.sr.NumContentItem(name=cc(codes.STANDARD_DEVIATION), value=float(ref["sd"]), unit=unit,
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


def fix_uncertainty_units(num: Dataset, m: Measurement) -> None:
    """Give the interval half-widths under ``num`` the measurement's own unit."""
    for child in num.get("ContentSequence") or []:
        if child.ValueType == "NUM" and child.ConceptNameCodeSequence[0].CodeValue in _UNCERTAINTY:
            unit = child.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
            unit.CodeValue, unit.CodeMeaning = m.unit, m.unit_meaning or m.unit


def measurement_notes(m: Measurement, caveats: Sequence[str]) -> list[Dataset]:
    """TEXT (and coded caveat) items that qualify one NUM item (HAS PROPERTIES)."""
    out: list[Dataset] = []
    if m.reference:
        from screener.references import describe
        out.append(text_item(pcodes.DCM.Comment, f"T-score reference: {describe(m.reference)} "
                                             f"({m.reference.get('source', '')})", "HAS PROPERTIES"))
    if m.interval is not None:
        out.append(text_item(cc(codes.PREDICTION_INTERVAL),
                         f"{100 * m.interval_level:.0f} % prediction interval {m.interval[0]:.4g} to "
                         f"{m.interval[1]:.4g} {m.unit if m.unit != '1' else ''}".rstrip()
                         + (f" ({m.interval_method})" if m.interval_method else ""), "HAS PROPERTIES"))
    for text in caveats:
        code = codes.flag_code(text)
        if code is not None:
            out.append(hd.sr.CodeContentItem(name=cc(codes.FLAG), value=cc(code),
                                             relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES))
        out.append(text_item(pcodes.DCM.Comment, text, "HAS PROPERTIES"))
    return out


def algorithm(finding: Finding) -> hd.sr.AlgorithmIdentification:
    """TID 4019 of the code that produced ``finding``: for a model protocol the bundle that ran
    (name ``screener <protocol> model bundle <bundle>``, version = the bundle's version)."""
    d = finding.details
    params = [f"model bundle {d['bundle_id']}"] if d.get("bundle_id") else []
    if d.get("training_data"):
        params.append(f"trained on: {d['training_data']}"[:1024])
    name, version = algorithm_name_version(finding)
    return hd.sr.AlgorithmIdentification(name=name, version=version, parameters=params or None)


def algorithm_name_version(finding: Finding) -> tuple[str, str]:
    """The name and version :func:`algorithm` gives ``finding`` (each at most 64 characters): the
    SEG's and the Parametric Map's algorithm identification reads the same."""
    d = finding.details
    if d.get("bundle_id"):
        name = f"screener {finding.protocol} model bundle {str(d['bundle_id']).split('@')[0]}"
        version = str(d.get("bundle_version") or str(d["bundle_id"]).partition("@")[2] or finding.protocol_version)
    else:
        name, version = f"screener {finding.protocol}", finding.protocol_version
    return name[:64], version[:64]


def study_items(result: StudyResult) -> list[Dataset]:
    """The study-level result: the category as a coded evaluation, the intended use, the result in
    words with the agreement, each contributing measurement with its method, notes and the rule."""
    code = codes.STUDY_CATEGORIES[result.category]
    items: list[Dataset] = [
        hd.sr.CodeContentItem(name=cc(codes.STUDY_RESULT), value=cc(code),
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        hd.sr.CodeContentItem(name=cc(codes.INTENDED_USE), value=cc(codes.NOT_FOR_DIAGNOSTIC_USE),
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        text_item(cc(codes.STUDY_RESULT),
                  f"Study result: {result.category.replace(chr(0x2014), '-')}; {result.agreement}")]
    items += [text_item(cc(codes.CONTRIBUTING), c.line()) for c in result.contributions]
    items += [text_item(pcodes.DCM.Comment, n) for n in result.notes]
    items.append(text_item(cc(codes.STUDY_RULE),
                           "Rule (docs/study-result.md): measured L1 attenuation first, then model estimates by "
                           "validated accuracy; methods whose uncertainty ranges do not overlap give "
                           "'discordant - review' and no grade"))
    return items


def coverage_items(decisions: Sequence[tuple[str, bool, str]]) -> list[Dataset]:
    """Every protocol the router considered: measured, or not measured with the reason in words
    (one coded outcome per protocol, then one TEXT line per protocol, in the same order)."""
    items: list[Dataset] = [hd.sr.CodeContentItem(
        name=cc(codes.PROTOCOL_OUTCOME), value=cc(codes.PROTOCOL_RAN if ran else codes.PROTOCOL_NOT_RUN),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS) for _, ran, _ in decisions]
    items += [text_item(cc(codes.PROTOCOL_OUTCOME), line) for line in coverage_lines(decisions)]
    return items


def qualitative_evaluations(result: StudyResult, decisions: Sequence[tuple[str, bool, str]] | None
                            ) -> hd.sr.ContainerContentItem:
    """TID 1500's "Qualitative Evaluations" container (UMLS C0034375): the study-level result
    (:func:`study_items`) and, when given, the protocol coverage (:func:`coverage_items`).

    They have no image region, so they are not measurement groups: OHIF 3.13 draws every
    measurement group on its image and fails on a group without a graphic.
    """
    container = hd.sr.ContainerContentItem(name=cc(codes.QUALITATIVE_EVALUATIONS),
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = [*study_items(result), *coverage_items(decisions or [])]
    return container


def coverage_lines(decisions: Sequence[tuple[str, bool, str]]) -> list[str]:
    """``"<what> (<protocol>): measured"`` or ``"<what> (<protocol>) not measured: <reason>"``."""
    out = []
    for name, ran, reason in decisions:
        what = PROTOCOL_WORDS.get(name, name)
        out.append(f"{what} ({name}): measured" if ran else f"{what} ({name}) not measured: {reason}")
    return out
