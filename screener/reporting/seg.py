"""DICOM Segmentation (SEG) of the regions the screener measured (issue 20 item 2).

:func:`build_seg` turns the planar ROIs of a series' findings -- the same regions the SR draws as
closed polylines (:func:`screener.reporting.sr._group`) -- into one binary SEG that references the
source slices: one segment per finding, labelled ``"<site> ROI (<protocol>)"``, the segmented
property the finding's site (e.g. SCT L1 vertebra), the algorithm the finding's (TID 4019 name and
version; family "Artificial Intelligence" for a model bundle, "Morphological Operations" for the
classical L1 attenuation ROI).  A viewer that fuses a SEG (OHIF, 3D Slicer) shows where each value
was measured as a filled region over the CT.

Left out: ROIs that are only the footprint of a reformat (:data:`screener.reporting.sr.REFORMAT_PROTOCOLS`),
ROIs on a frame of a multi-frame image, ROIs on projection images (radiographs have no frame of
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
from screener.findings import Finding
from screener.radiograph import PROJECTION_MODALITIES
from screener.reporting.content import algorithm

SEG_SERIES_DESCRIPTION = "Bone density screening ROIs (SEG)"
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


def seg_findings(findings: Sequence[Finding], sources: dict[str, Dataset]) -> list[Finding]:
    """The findings :func:`build_seg` makes a segment of (see the module's docstring)."""
    from screener.reporting.sr import REFORMAT_PROTOCOLS

    out: list[Finding] = []
    series = None
    for f in findings:
        roi = f.roi
        if roi is None or f.protocol in REFORMAT_PROTOCOLS or roi.frame_number \
                or roi.source_sop_instance_uid not in sources:
            continue
        src = sources[roi.source_sop_instance_uid]
        if str(src.get("Modality", "")).strip().upper() in PROJECTION_MODALITIES \
                or "FrameOfReferenceUID" not in src or "ImagePositionPatient" not in src:
            continue
        series = series or str(src.SeriesInstanceUID)
        if str(src.SeriesInstanceUID) == series:
            out.append(f)
    return out


def _algorithm(finding: Finding) -> hd.AlgorithmIdentificationSequence:
    algo = algorithm(finding)
    name = str(algo[0].TextValue)
    version = str(algo[1].TextValue) if len(algo) > 1 else finding.protocol_version
    family = pcodes.cid7162.ArtificialIntelligence if finding.details.get("bundle_id") \
        else pcodes.cid7162.MorphologicalOperations
    return hd.AlgorithmIdentificationSequence(name=name, family=family, version=version or "0")


def build_seg(findings: Sequence[Finding], sources: Sequence[Dataset], *,
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
    chosen = seg_findings(findings, by_uid)
    if not chosen:
        return None
    slices: list[str] = []
    for f in chosen:
        assert f.roi is not None
        if f.roi.source_sop_instance_uid not in slices:
            slices.append(f.roi.source_sop_instance_uid)
    source_images = [by_uid[u] for u in slices]
    rows, cols = int(source_images[0].Rows), int(source_images[0].Columns)
    masks = np.zeros((len(slices), rows, cols, len(chosen)), dtype=bool)
    descriptions = []
    for s, f in enumerate(chosen, start=1):
        assert f.roi is not None
        masks[slices.index(f.roi.source_sop_instance_uid), :, :, s - 1] = roi_mask(f.roi.polygon, rows, cols)
        site = hd.sr.CodedConcept(value=f.site_code.value, scheme_designator=f.site_code.scheme_designator,
                                  meaning=f.site_code.meaning) if f.site_code is not None else pcodes.SCT.Bone
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=s, segment_label=f"{f.site} ROI ({f.protocol})"[:64],
            segmented_property_category=pcodes.SCT.AnatomicalStructure, segmented_property_type=site,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=_algorithm(f),
            tracking_uid=generate_uid(), tracking_id=f"{f.site} {f.protocol}"[:64],
            display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_COLOURS[(s - 1) % len(SEGMENT_COLOURS)])))
    seg = hd.seg.Segmentation(
        source_images=source_images, pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=series_uid or generate_uid(), series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=instance_number,
        manufacturer=manufacturer, manufacturer_model_name="screener",
        software_versions=f"screener {__version__}", device_serial_number="0",
        content_label="ROIS", content_description="Regions the screener measured",
        series_description=SEG_SERIES_DESCRIPTION)
    return seg
