"""DICOM Segmentation (SEG) of the regions the screener measured (issue 20 item 2).

:func:`build_seg` turns the planar ROIs of a series' findings -- the same regions the SR draws as
closed polylines (:func:`screener.reporting.sr._group`) -- into one binary SEG that references the
source slices: one segment per finding, labelled ``"<site> ROI (<protocol>)"``.  A second SEG
(``content="layers"``) holds one segment per mask a protocol outlined
(:class:`screener.findings.ImageLayer`, e.g. l1_attenuation's ``"L1 trabecular body"`` on every
slice its outline walked) and the top decile of each explanation map (l1_axial's ``"Grad-RAMP top
decile"``: where the model's estimate depended most; the whole map goes to a Parametric Map,
:mod:`screener.reporting.pmap`).  In each, the segmented
property the finding's site (e.g. SCT L1 vertebra), the algorithm the finding's (TID 4019 name and
version; family "Artificial Intelligence" for a model bundle, "Morphological Operations" for the
classical L1 attenuation ROI).  A viewer that fuses a SEG (OHIF, 3D Slicer) shows where each value
was measured as a filled region over the CT.

Left out: ROIs that are only the footprint of a reformat (:data:`screener.reporting.sr.REFORMAT_PROTOCOLS`),
ROIs and masks on frames of a multi-frame image, ROIs on projection images (radiographs have no frame of
reference a SEG of a volume needs), and ROIs of another series than the first one's.
"""
from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes
from pydicom.uid import generate_uid

from screener import __version__
from screener.findings import Finding, ImageLayer
from screener.radiograph import PROJECTION_MODALITIES
from screener.reporting.content import algorithm_name_version

SEG_SERIES_DESCRIPTION = "Bone density screening ROIs (SEG)"
LAYER_SEG_SERIES_DESCRIPTION = "Bone density screening outlines (SEG)"
#: display colours of the segments in order (RGB; stored as RecommendedDisplayCIELabValue)
SEGMENT_COLOURS = ((0, 200, 0), (255, 200, 0), (0, 160, 255), (255, 80, 80), (200, 0, 255), (0, 220, 220))


def roi_mask(polygon: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Boolean ``(rows, cols)`` mask of the pixels whose centres lie inside a closed SCOORD polygon.

    ``polygon`` is ``(N, 2)`` ``(column, row)`` in SCOORD image coordinates (the top-left corner of
    the top-left pixel is ``(0, 0)``, so pixel ``[j, i]`` has its centre at ``(i + 0.5, j + 0.5)``).
    """
    img = Image.new("1", (cols, rows), 0)
    pts = [(float(c) - 0.5, float(r) - 0.5) for c, r in np.asarray(polygon, dtype=float)]
    ImageDraw.Draw(img).polygon(pts, fill=1, outline=1)
    return np.asarray(img, dtype=bool)


def _on_ct_slice(uid: str, sources: dict[str, Dataset]) -> bool:
    """Whether ``uid`` is a source image a SEG of a volume can reference (a CT-like slice with a
    frame of reference and a position; not a projection radiograph)."""
    src = sources.get(uid)
    return src is not None and str(src.get("Modality", "")).strip().upper() not in PROJECTION_MODALITIES \
        and "FrameOfReferenceUID" in src and "ImagePositionPatient" in src \
        and int(src.get("NumberOfFrames", 1) or 1) == 1


def series_of(layer: ImageLayer, sources: dict[str, Dataset]) -> str:
    """The one series whose single-frame CT slices all of ``layer``'s planes lie on; ``""`` when
    the layer is empty, lies on other images, or on slices of more than one series (a SEG or a
    Parametric Map references the slices of one series)."""
    if not layer.planes or not all(_on_ct_slice(u, sources) for u in layer.planes):
        return ""
    series = {str(sources[u].SeriesInstanceUID) for u in layer.planes}
    return series.pop() if len(series) == 1 else ""


def seg_findings(findings: Sequence[Finding], sources: dict[str, Dataset]) -> list[Finding]:
    """The findings whose ROI :func:`build_seg` makes a segment of (see the module's docstring)."""
    from screener.reporting.sr import REFORMAT_PROTOCOLS

    out: list[Finding] = []
    series = None
    for f in findings:
        roi = f.roi
        if roi is None or f.protocol in REFORMAT_PROTOCOLS or roi.frame_number \
                or not _on_ct_slice(roi.source_sop_instance_uid, sources):
            continue
        src = sources[roi.source_sop_instance_uid]
        series = series or str(src.SeriesInstanceUID)
        if str(src.SeriesInstanceUID) == series:
            out.append(f)
    return out


def _segments(findings: Sequence[Finding], sources: dict[str, Dataset], content: str = "rois"
              ) -> list[tuple[Finding, str, dict[str, np.ndarray]]]:
    """``(finding, label, {source UID: mask})`` of every segment of one SEG: for ``content="rois"``
    each ROI of :func:`seg_findings`; for ``"layers"`` each mask layer
    (:class:`~screener.findings.ImageLayer`) and the top decile of each map layer whose planes all
    lie on single-frame CT slices of one series (the first such layer's)."""
    if content not in ("rois", "layers"):
        raise ValueError(f"SEG content is 'rois' or 'layers', not {content!r}")
    out: list[tuple[Finding, str, dict[str, np.ndarray]]] = []
    if content == "rois":
        for f in seg_findings(findings, sources):
            assert f.roi is not None
            src = sources[f.roi.source_sop_instance_uid]
            mask = roi_mask(f.roi.polygon, int(src.Rows), int(src.Columns))
            out.append((f, f"{f.site} ROI ({f.protocol})", {f.roi.source_sop_instance_uid: mask}))
        return out
    series = ""
    for f in findings:
        for layer in f.layers:
            layer_series = series_of(layer, sources)
            if not layer_series or (series and layer_series != series):
                continue
            series = layer_series
            if layer.kind == "mask":
                out.append((f, f"{layer.label} ({f.protocol})", dict(layer.planes)))
            else:
                out.append((f, f"{layer.label} top decile ({f.protocol})", top_decile(layer.planes)))
    return out


def top_decile(planes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Where an explanation map is in its top decile: the pixels whose value is at least the 90th
    percentile of the map's values over the region it covers (its non-zero pixels, i.e. the model's
    input crop), over all its planes together."""
    values = np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in planes.values()])
    covered = values[values > 0]
    if covered.size == 0:
        return {u: np.zeros(np.shape(p), dtype=bool) for u, p in planes.items()}
    threshold = float(np.quantile(covered, 0.9))
    return {u: np.asarray(p, dtype=np.float32) >= max(threshold, np.finfo(np.float32).tiny)
            for u, p in planes.items()}


def _algorithm(finding: Finding) -> hd.AlgorithmIdentificationSequence:
    name, version = algorithm_name_version(finding)
    family = pcodes.cid7162.ArtificialIntelligence if finding.details.get("bundle_id") \
        else pcodes.cid7162.MorphologicalOperations
    return hd.AlgorithmIdentificationSequence(name=name, family=family, version=version or "0")


def build_seg(findings: Sequence[Finding], sources: Sequence[Dataset], *, content: str = "rois",
              series_uid: str | None = None, sop_instance_uid: str | None = None,
              series_number: int = 903, instance_number: int = 1,
              manufacturer: str = "screener") -> hd.seg.Segmentation | None:
    """A binary SEG of the findings' planar ROIs on their source slices.

    Parameters
    ----------
    findings : sequence of Finding
    sources : sequence of pydicom.dataset.Dataset
        Headers of the source images (pixel data not needed); each ROI's slice must be among
        them for its segment to be made.
    content : {"rois", "layers"}
        ``"rois"``: the measured ROIs (series "Bone density screening ROIs (SEG)"); ``"layers"``:
        the outlined structures and the explanation maps' top deciles (series "Bone density
        screening outlines (SEG)").  Two objects, because a viewer that turns a SEG into one
        labelmap (OHIF 3.13) drops segments where more than two overlap on a slice -- an ROI,
        the body around it and the map's top decile would.
    series_uid, sop_instance_uid : str, optional
        Generated when omitted.
    series_number, instance_number : int
    manufacturer : str

    Returns
    -------
    highdicom.seg.Segmentation or None
        ``None`` when no finding has a region a SEG can hold (:func:`seg_findings`).
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    segments = _segments(findings, by_uid, content)
    if not segments:
        return None
    slices = list(dict.fromkeys(u for _, _, planes in segments for u in planes))
    source_images = [by_uid[u] for u in slices]
    rows, cols = int(source_images[0].Rows), int(source_images[0].Columns)
    # segment-major in memory, (frames, rows, columns, segments) as highdicom takes it: the same
    # values, but highdicom's sum over the segment axis (its overlap check, most of a SEG's cost)
    # adds whole planes instead of reducing a 2-wide innermost axis (5 times faster)
    by_segment = np.zeros((len(segments), len(slices), rows, cols), dtype=bool)
    masks = np.moveaxis(by_segment, 0, -1)
    descriptions = []
    for s, (f, label, planes) in enumerate(segments, start=1):
        for uid, plane in planes.items():
            by_segment[s - 1, slices.index(uid)] = plane
        site = hd.sr.CodedConcept(value=f.site_code.value, scheme_designator=f.site_code.scheme_designator,
                                  meaning=f.site_code.meaning) if f.site_code is not None else pcodes.SCT.Bone
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=s, segment_label=label[:64],
            segmented_property_category=pcodes.SCT.AnatomicalStructure, segmented_property_type=site,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=_algorithm(f),
            tracking_uid=generate_uid(), tracking_id=label[:64],
            display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_COLOURS[(s - 1) % len(SEGMENT_COLOURS)])))
    seg = hd.seg.Segmentation(
        source_images=source_images, pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=series_uid or generate_uid(), series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=instance_number,
        manufacturer=manufacturer, manufacturer_model_name="screener",
        software_versions=f"screener {__version__}", device_serial_number="0",
        content_label="ROIS" if content == "rois" else "OUTLINES",
        content_description="Regions the screener measured" if content == "rois"
        else "Structures the screener outlined; where its models looked",
        series_description=SEG_SERIES_DESCRIPTION if content == "rois" else LAYER_SEG_SERIES_DESCRIPTION)
    return seg
