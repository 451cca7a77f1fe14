"""DICOM Parametric Map of the explanation maps the screener's CT models made (issue 20 item 2).

IHE AI Results (AIR) carries an AI result as SR + SEG + Parametric Map with the algorithm
identified.  :func:`build_pmap` writes one map layer (:class:`screener.findings.ImageLayer`,
``kind="map"``; today l1_axial's Grad-RAMP, resampled from the model's L1 crop onto the source
slice's pixel grid by :func:`screener.explain.map_onto_slice`) as a float Parametric Map that
references its source slices: values in [0, 1] with an identity real-world value mapping (no
units; 1 = where the ensemble's estimate depended most), 0 outside the crop.  The algorithm --
bundle, version, explanation method -- is named in the Content Description and in a Contributing
Equipment item.  A viewer that fuses a Parametric Map (OHIF's ``cornerstone-dicom-pmap``, 3D
Slicer) shows it as a colour layer over the CT.

Left out, as for the SEG (:mod:`screener.reporting.seg`): maps on frames of a multi-frame image,
on radiographs, and on reformats (femur_coronal, lumbar_sagittal keep their maps on the overlays).
"""
from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from screener import __version__
from screener.findings import Finding, ImageLayer
from screener.reporting.content import algorithm_name_version
from screener.reporting.seg import series_of

PMAP_SERIES_DESCRIPTION = "Bone density screening explanation map"
#: UCUM "no units" for the map's values
NO_UNITS = Code("1", "UCUM", "no units")
#: purpose of the Contributing Equipment item (CID 7005): the screener processed the source images
PROCESSING = Code("109102", "DCM", "Processing Equipment")


def pmap_layers(findings: Sequence[Finding], sources: dict[str, Dataset]) -> list[tuple[Finding, ImageLayer]]:
    """``(finding, layer)`` of every map layer :func:`build_pmap` can write: all its planes on
    single-frame CT slices of one series among ``sources``."""
    return [(f, layer) for f in findings for layer in f.layers
            if layer.kind == "map" and series_of(layer, sources)]


def build_pmap(finding: Finding, layer: ImageLayer, sources: Sequence[Dataset], *,
               series_uid: str | None = None, sop_instance_uid: str | None = None,
               series_number: int = 904, instance_number: int = 1,
               manufacturer: str = "screener") -> hd.pm.ParametricMap:
    """A float Parametric Map of one explanation map layer on its source slices.

    Parameters
    ----------
    finding : Finding
        The finding the map explains (its algorithm names the map's).
    layer : ImageLayer
        ``kind="map"``; planes keyed by source SOP Instance UID, values in [0, 1].
    sources : sequence of pydicom.dataset.Dataset
        Headers of the source images (pixel data not needed); every plane's image must be among them.
    series_uid, sop_instance_uid : str, optional
        Generated when omitted.
    series_number, instance_number : int
    manufacturer : str

    Returns
    -------
    highdicom.pm.ParametricMap

    Raises
    ------
    ValueError
        The layer is not a map, or one of its images is not among ``sources``.
    """
    if layer.kind != "map":
        raise ValueError(f"a Parametric Map holds a map layer, not a {layer.kind!r}")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [u for u in layer.planes if u not in by_uid]
    if missing:
        raise ValueError(f"the map lies on {len(missing)} image(s) not among the source headers")
    uids = list(layer.planes)
    source_images = [by_uid[u] for u in uids]
    pixels = np.stack([np.clip(np.asarray(layer.planes[u], dtype=np.float32), 0.0, 1.0) for u in uids])
    name, version = algorithm_name_version(finding)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=layer.label[:16].upper().replace(" ", "_") or "MAP",
        lut_explanation=layer.label[:64], unit=NO_UNITS, value_range=(0.0, 1.0), slope=1.0, intercept=0.0)
    description = f"{layer.label} of {name} {version}"[:64]
    equipment = hd.ContributingEquipment(
        manufacturer=manufacturer, purpose_of_reference=PROCESSING, manufacturer_model_name=name[:64],
        software_versions=version[:64] or "0", contribution_description=(layer.method or description)[:1024])
    pm = hd.pm.ParametricMap(
        source_images=source_images, pixel_array=pixels,
        series_instance_uid=series_uid or generate_uid(), series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=instance_number,
        manufacturer=manufacturer, manufacturer_model_name="screener",
        software_versions=f"screener {__version__}", device_serial_number="0",
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0,
                                                         window_explanation="whole map [0, 1]")],
        content_label="EXPLANATION",
        content_description=description, content_creator_name=None,
        image_flavor=hd.pm.ImageFlavorValues.VOLUME,
        derived_pixel_contrast=hd.pm.DerivedPixelContrastValues.NONE,
        contributing_equipment=[equipment], series_description=PMAP_SERIES_DESCRIPTION)
    _frame_anatomy(pm, finding)
    return pm


def _frame_anatomy(pm: Dataset, finding: Finding) -> None:
    """Frame Anatomy functional group (shared): the finding's site as the anatomic region and frame
    laterality ``U`` (unpaired: the spine), so that the General Series' Laterality is not needed."""
    region = Dataset()
    code = finding.site_code
    region.CodeValue = code.value if code is not None else "272673000"
    region.CodingSchemeDesignator = code.scheme_designator if code is not None else "SCT"
    region.CodeMeaning = code.meaning if code is not None else "Bone"
    item = Dataset()
    item.AnatomicRegionSequence = [region]
    item.FrameLaterality = "U"
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [item]
    if "Laterality" in pm and not pm.Laterality:
        del pm.Laterality
