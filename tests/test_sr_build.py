"""build_sr builds highdicom's Comprehensive SR without highdicom's passes over the content tree
(:func:`screener.reporting.sr._comprehensive_sr`): every attribute is what highdicom's own
constructor writes."""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from screener.findings import Finding, RoiGeometry
from screener.scores import bmd_measurement
from tests.ct_factory import make_ct_series

#: attributes that differ between two builds of the same report: times, and the tracking UIDs
#: highdicom generates
_VARYING = {0x0040A124, 0x00620021}


def _dump(ds: Dataset, depth: str = "") -> list[str]:
    out = []
    for e in ds:
        if e.VR == "SQ":
            out.append(f"{depth}{e.tag} SQ {len(e.value)}")
            for item in e.value:
                out += _dump(item, depth + " ")
        elif e.VR in ("DA", "TM", "DT") or e.tag in _VARYING:
            out.append(f"{depth}{e.tag} {e.VR} <varies>")
        else:
            out.append(f"{depth}{e.tag} {e.VR} {e.value!r}")
    return out


def _findings(headers: list[Dataset]) -> list[Finding]:
    """Two findings on two slices: one with a polygon ROI, one measured at a centre point."""
    a, b = headers[10], headers[14]
    roi = RoiGeometry(source_sop_instance_uid=str(a.SOPInstanceUID), source_sop_class_uid=str(a.SOPClassUID),
                      polygon=np.array([[60.0, 80.0], [90.0, 80.0], [90.0, 95.0], [60.0, 95.0], [60.0, 80.0]]),
                      centre_mm=(10.0, 20.0, float(a.ImagePositionPatient[2])), area_mm2=450.0, slice_index=10)
    return [Finding(protocol="l1_axial", protocol_version="1.1.0", site="L1",
                    measurements=[bmd_measurement(0.81, site="spine", name="L1 BMD")], roi=roi,
                    referenced_sop_instance_uids=[str(a.SOPInstanceUID)],
                    flags=["fold disagreement"]),
            Finding(protocol="lumbar_sagittal", protocol_version="1.0.0", site="L2",
                    measurements=[bmd_measurement(0.92, site="spine", name="L2 BMD")],
                    referenced_sop_instance_uids=[str(b.SOPInstanceUID)],
                    details={"centroid_mm": [0.0, 15.0, float(b.ImagePositionPatient[2])]})]


@pytest.fixture(scope="module")
def ct_headers(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    ct = make_ct_series(tmp_path_factory.mktemp("ct"), rows=96, cols=96, n_slices=20)
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in ct.paths]


def test_sr_is_what_highdicoms_constructor_writes(ct_headers: list[Dataset], monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    import screener.reporting.sr as sr

    findings = _findings(ct_headers)
    kw = dict(series_uid="1.2.826.0.1.3680043.8.498.1", sop_instance_uid="1.2.826.0.1.3680043.8.498.2",
              decisions=[("l1_axial", True, "ran"), ("femur_coronal", False, "femoral heads not in coverage")])
    fast = sr.build_sr(findings, ct_headers, **kw)
    monkeypatch.setattr(sr, "_comprehensive_sr", lambda **k: hd.sr.ComprehensiveSR(**k))
    plain = sr.build_sr(findings, ct_headers, **kw)
    assert len(_dump(plain)) > 300
    assert _dump(fast) == _dump(plain)
    # .content is the parsed tree, as highdicom's
    assert isinstance(fast.content[0], hd.sr.value_types.ContainerContentItem)
    assert _dump(fast.content[0]) == _dump(plain.content[0])
    # and the file written is a Comprehensive SR that reads back with the same tree
    back = pydicom.dcmread(sr.write_sr(fast, tmp_path))
    assert back.SOPClassUID == sr.COMPREHENSIVE_SR and _dump(back)[-50:] == _dump(plain)[-50:]


def test_a_reference_missing_from_the_sources_is_still_refused(ct_headers: list[Dataset]) -> None:
    from screener.reporting.sr import build_sr

    findings = _findings(ct_headers)
    with pytest.raises(ValueError, match="not among the source datasets"):
        build_sr(findings, ct_headers[:12])
