"""The per-series pipeline: headers -> route -> load -> protocols -> SR + SC.

:func:`process_series` is what the daemon's worker and ``screener replay``
call for one series. It never raises for a property of the input: every
outcome is a :class:`PipelineResult` whose ``status`` is ``"done"``
(findings and outputs written; findings are returned only with the SR that
reports them), ``"skipped"`` (no protocol applies or the
series is unusable, with the reason) or ``"failed"`` (an unexpected error,
with its text). ``decisions`` has one ``(protocol, accepted, reason)`` per
registered protocol, updated with what happened when it ran (a protocol
that declines after loading, e.g. ``"L1 not in view"``, ends as refused).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import structlog
from pydicom.uid import generate_uid

from screener.config import Config
from screener.findings import Finding
from screener.protocols.base import Protocol, ProtocolContext, ProtocolDeclined
from screener.router import Router, summarize
from screener.series import SeriesInfo, SeriesUnusable, load_volume, read_series_info

if TYPE_CHECKING:  # pragma: no cover
    from screener.domain import Volume
    from screener.study_result import StudyResult

log = structlog.get_logger(__name__)

SR_SERIES_NUMBER = 901
SC_SERIES_NUMBER = 902
SEG_SERIES_NUMBER = 903
PMAP_SERIES_NUMBER = 904
LAYER_SEG_SERIES_NUMBER = 905


@dataclass
class OutputObject:
    """A DICOM object the pipeline wrote (to be recorded and exported)."""

    kind: str  # "SR" | "SC" | "SEG" | "PMAP"
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    supersedes: str = ""  # SOP Instance UID of the SR this one replaces


@dataclass
class PipelineResult:
    """Outcome of :func:`process_series` (see module docstring)."""

    status: str
    reason: str
    decisions: list[tuple[str, bool, str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    outputs: list[OutputObject] = field(default_factory=list)


def output_series_uid(source_series_uid: str, kind: str) -> str:
    """Deterministic UID of the SR / SC series derived from a source series.

    Re-runs of the same series put their (superseding) outputs in the same
    output series.
    """
    return generate_uid(entropy_srcs=[source_series_uid, "screener", kind])


def _previous_sr(supersedes: str | Path | None) -> pydicom.Dataset | None:
    if not supersedes:
        return None
    try:
        return pydicom.dcmread(supersedes, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001
        log.warning("superseded SR unreadable; the new SR will not reference it",
                    path=str(supersedes), error=str(exc))
        return None


def process_series(paths: list[Path], *, config: Config, out_dir: Path,
                   supersedes: str | Path | None = None,
                   protocols: list[Protocol] | None = None) -> PipelineResult:
    """Run the whole analysis of one series and write its SR and SC objects.

    Parameters
    ----------
    paths : list of pathlib.Path
        Instance files of one series.
    config : Config
        Effective configuration (``contrast_adjust_hu``, ...).
    out_dir : pathlib.Path
        Where ``<SOPInstanceUID>.dcm`` outputs are written (created if needed).
    supersedes : path-like, optional
        The previous SR of this series; the new SR lists it in
        PredecessorDocumentsSequence and ``OutputObject.supersedes`` holds its UID.
    protocols : list of Protocol, optional
        Registered protocols (default :func:`screener.protocols.default_protocols`).

    Returns
    -------
    PipelineResult
    """
    if protocols is None:
        from screener.protocols import default_protocols
        protocols = default_protocols(config.protocols)
    names = [p.name for p in protocols]
    try:
        # decode once (issue 21): the files are read whole here and the volume is decoded from them
        info = read_series_info([Path(p) for p in paths], with_pixels=True)
    except SeriesUnusable as exc:
        return PipelineResult("skipped", f"series unusable: {exc.reason}",
                              [(n, False, f"series unusable: {exc.reason}") for n in names])
    try:
        routed = Router(protocols).route(info)
    except ValueError as exc:  # duplicate protocol names: a configuration error
        return PipelineResult("failed", str(exc), [(n, False, str(exc)) for n in names])
    decisions = {p.name: (p.name, d.accepted, d.reason) for p, d in routed}
    accepted = [p for p, d in routed if d.accepted]
    if not accepted:
        dl = list(decisions.values())
        return PipelineResult("skipped", f"no protocol applies: {summarize(dl)}", dl)

    volume: Volume | None = None
    if any(p.needs_volume for p in accepted):
        try:
            volume = load_volume(info.paths, datasets=info.datasets)
        except SeriesUnusable as exc:
            for p in accepted:
                if p.needs_volume:
                    decisions[p.name] = (p.name, False, f"series unusable: {exc.reason}")
            accepted = [p for p in accepted if not p.needs_volume]
        except Exception as exc:  # noqa: BLE001
            log.exception("loading failed", series_uid=info.series_uid)
            return PipelineResult("failed", f"loading failed: {type(exc).__name__}: {exc}",
                                  list(decisions.values()))

    findings, errors = _run_protocols(accepted, volume, ProtocolContext(config=config, info=info), decisions)
    dl = list(decisions.values())
    if not findings:
        if errors:
            return PipelineResult("failed", "; ".join(errors), dl)
        return PipelineResult("skipped", f"no protocol applies: {summarize(dl)}", dl)

    result = report_findings(findings, info, config)
    try:
        outputs = _write_outputs(findings, _source_headers(volume, info), info.series_uid,
                                 Path(out_dir), supersedes, decisions=dl, result=result,
                                 seg=config.seg_output, pmap=config.pmap_output)
    except Exception as exc:  # noqa: BLE001
        log.error("report writing failed", series_uid=info.series_uid,
                  error=f"{type(exc).__name__}: {exc}")
        log.debug("report writing failed", series_uid=info.series_uid, traceback=traceback.format_exc())
        # no SR, no results: the findings of a job whose report was not written are not kept
        return PipelineResult("failed", f"report writing failed: {type(exc).__name__}: {exc}", dl)
    reason = "; ".join(errors) if errors else ""
    log.info("series done", series_uid=info.series_uid, findings=len(findings),
             outputs=[o.kind for o in outputs])
    return PipelineResult("done", reason, dl, findings, outputs)


def _run_protocols(accepted: list[Protocol], volume: Volume | None, context: ProtocolContext,
                   decisions: dict[str, tuple[str, bool, str]]) -> tuple[list[Finding], list[str]]:
    """Run each accepted protocol; a decline or an error updates its decision in place and the
    others go on. Returns the findings (with their study, series and algorithm version set) and
    the errors."""
    info = context.info
    findings: list[Finding] = []
    errors: list[str] = []
    for p in accepted:
        try:
            got = p.run(volume, context)  # type: ignore[arg-type]
        except ProtocolDeclined as exc:
            decisions[p.name] = (p.name, False, exc.reason)
            continue
        except Exception as exc:  # noqa: BLE001 - one protocol's bug must not hide the others
            log.error("protocol failed", protocol=p.name, series_uid=info.series_uid,
                      error=str(exc), traceback=traceback.format_exc())
            decisions[p.name] = (p.name, False, f"error: {type(exc).__name__}: {exc}")
            errors.append(f"{p.name}: {type(exc).__name__}: {exc}")
            continue
        for f in got:
            f.study_uid = f.study_uid or info.study_uid
            f.series_uid = f.series_uid or info.series_uid
            f.protocol_version = p.algorithm_version(f)  # the bundle's version for model protocols
        findings.extend(got)
        decisions[p.name] = (p.name, True, f"{decisions[p.name][2]}; {len(got)} finding(s)")
    return findings, errors


def report_findings(findings: list[Finding], info: SeriesInfo, config: Config) -> "StudyResult":
    """Put the configured T-score reference on every T-score (:func:`screener.scores.apply_references`),
    the bundles' prediction intervals and the fold-disagreement flag (:func:`screener.uncertainty.annotate`)
    on the estimates, and combine them with the newest findings of the study's other series already
    in the database into the study-level result, recorded with each finding
    (``details["study_result"]``)."""
    from screener.references import patient_sex
    from screener.scores import apply_references
    from screener.study_result import study_result
    from screener.uncertainty import annotate

    apply_references(findings, sex=patient_sex(info.header), config=config)
    annotate(findings, config.models_dir)
    earlier = _earlier_study_findings(info, config)
    result = study_result(findings + earlier)
    if earlier:
        n = len({f.series_uid for f in earlier})
        result.notes.append(f"combines this series with {len(earlier)} finding(s) of {n} other series of the "
                            "study processed earlier")
    for f in findings:
        f.details["study_result"] = result.to_record()
    return result


def _earlier_study_findings(info: SeriesInfo, config: Config) -> list[Finding]:
    """Findings already recorded for the other series of this study (none without a database)."""
    if not info.study_uid or not Path(config.db_path).is_file():
        return []
    from screener.db import Database
    from screener.results import other_series_findings

    try:
        db = Database(config.db_path)
        try:
            return other_series_findings(db, info.study_uid, info.series_uid)
        finally:
            db.close()
    except Exception as exc:  # noqa: BLE001 - the series' own result stands without them
        log.warning("earlier findings of the study unreadable", study_uid=info.study_uid, error=str(exc))
        return []


def _source_headers(volume: "Volume | None", info: SeriesInfo) -> list[pydicom.Dataset]:
    """Headers of the series' images: the volume's, or read from the files (radiographs)."""
    if volume is not None:
        return list(volume.datasets)
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in info.paths]


def _write_outputs(findings: list[Finding], sources: list[pydicom.Dataset], series_uid: str,
                   out_dir: Path, supersedes: str | Path | None, *,
                   decisions: list[tuple[str, bool, str]] | None = None,
                   result: "StudyResult | None" = None, seg: bool = True,
                   pmap: bool = True) -> list[OutputObject]:
    from screener.reporting.sc import SC_SOP_CLASS, build_sc, write_sc
    from screener.reporting.sr import COMPREHENSIVE_SR, build_sr, write_sr

    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    previous = _previous_sr(supersedes)
    instance_number = 1
    if previous is not None:
        instance_number = int(previous.get("InstanceNumber") or 0) + 1
    needed = {u for f in findings for u in f.referenced_sop_instance_uids} | \
        {f.roi.source_sop_instance_uid for f in findings if f.roi is not None}
    sr = build_sr(findings, [by_uid[u] for u in by_uid if u in needed] or sources[:1],
                  series_uid=output_series_uid(series_uid, "SR"),
                  series_number=SR_SERIES_NUMBER, instance_number=instance_number,
                  previous=previous, decisions=decisions, result=result)
    outputs = [OutputObject("SR", write_sr(sr, out_dir), str(sr.SOPInstanceUID), COMPREHENSIVE_SR,
                            str(previous.SOPInstanceUID) if previous is not None else "")]
    for n, f in enumerate(findings, start=1):
        if f.overlay is None or f.roi is None or f.roi.source_sop_instance_uid not in by_uid:
            continue
        sc = build_sc(f, by_uid[f.roi.source_sop_instance_uid],
                      series_uid=output_series_uid(series_uid, "SC"),
                      sop_instance_uid=generate_uid(),
                      series_number=SC_SERIES_NUMBER,
                      instance_number=(instance_number - 1) * max(len(findings), 1) + n)
        outputs.append(OutputObject("SC", write_sc(sc, out_dir), str(sc.SOPInstanceUID),
                                    SC_SOP_CLASS))
    if seg:
        outputs += _write_seg(findings, sources, series_uid, out_dir, instance_number)
    if pmap:
        outputs += _write_pmaps(findings, by_uid, series_uid, out_dir, instance_number)
    return outputs


def _write_seg(findings: list[Finding], sources: list[pydicom.Dataset], series_uid: str, out_dir: Path,
               instance_number: int) -> list[OutputObject]:
    """The SEGs of a CT series' findings (:func:`screener.reporting.seg.build_seg`): the measured
    ROIs, and the outlined structures with the explanation maps' top deciles, each if there is
    anything to put in it. A SEG that cannot be built is logged and left out: the SR (the result)
    and the overlays stand without it."""
    from screener.reporting.sc import write_private
    from screener.reporting.seg import build_seg

    if not any(str(ds.get("Modality", "")).upper() == "CT" for ds in sources[:1]):
        return []
    out: list[OutputObject] = []
    for content, tag, number in (("rois", "SEG", SEG_SERIES_NUMBER), ("layers", "SEG-layers", LAYER_SEG_SERIES_NUMBER)):
        try:
            seg = build_seg(findings, sources, content=content, series_uid=output_series_uid(series_uid, tag),
                            series_number=number, instance_number=instance_number)
        except Exception as exc:  # noqa: BLE001 - the report is written; the SEG is an extra
            log.warning("SEG not written", series_uid=series_uid, content=content,
                        error=f"{type(exc).__name__}: {exc}")
            continue
        if seg is not None:
            out.append(OutputObject("SEG", write_private(seg, out_dir), str(seg.SOPInstanceUID), str(seg.SOPClassUID)))
    return out


def _write_pmaps(findings: list[Finding], by_uid: dict[str, pydicom.Dataset], series_uid: str,
                 out_dir: Path, instance_number: int) -> list[OutputObject]:
    """A Parametric Map of each explanation map on CT slices (:func:`screener.reporting.pmap.build_pmap`).
    One that cannot be built is logged and left out, as the SEG."""
    from screener.reporting.pmap import build_pmap, pmap_layers
    from screener.reporting.sc import write_private

    out: list[OutputObject] = []
    layers = pmap_layers(findings, by_uid)
    for n, (finding, layer) in enumerate(layers, start=1):
        try:
            pm = build_pmap(finding, layer, [by_uid[u] for u in layer.planes],
                            series_uid=output_series_uid(series_uid, "PMAP"), series_number=PMAP_SERIES_NUMBER,
                            instance_number=(instance_number - 1) * len(layers) + n)
        except Exception as exc:  # noqa: BLE001 - the report is written; the map is an extra
            log.warning("explanation Parametric Map not written", series_uid=series_uid, protocol=finding.protocol,
                        error=f"{type(exc).__name__}: {exc}")
            continue
        out.append(OutputObject("PMAP", write_private(pm, out_dir), str(pm.SOPInstanceUID), str(pm.SOPClassUID)))
    return out
