"""Router decisions with reasons (screener.router) and the pipeline's skip path."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from screener.config import Config
from screener.pipeline import process_series
from screener.protocols.base import Decision, Protocol
from screener.protocols.l1_attenuation.protocol import L1AttenuationProtocol
from screener.router import Router
from screener.series import SeriesInfo, read_series_info
from tests.ct_factory import make_ct_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
BASE = SeriesInfo(study_uid="1.2.3", series_uid="1.2.3.4", modality="CT",
                  sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                  image_type=("ORIGINAL", "PRIMARY", "AXIAL"), body_part="ABDOMEN",
                  orientation=AXIAL, n_instances=120, n_frames=120, kvp=120.0,
                  slice_thickness=2.5, z_range_mm=(-150.0, 150.0))


class XrayProtocol(Protocol):
    """A stand-in for a later radiograph protocol (accepts DX, derived allowed)."""

    name = "xray_fake"
    version = "9"
    accepts_derived = True
    needs_volume = False

    def accepts(self, info: SeriesInfo) -> Decision:
        ok = info.modality in ("DX", "CR")
        return Decision(ok, "radiograph" if ok else f"modality {info.modality} is not DX/CR")

    def run(self, volume, context):  # noqa: ANN001, ANN201
        return []


def decide(**changes) -> dict[str, Decision]:  # noqa: ANN003
    info = dataclasses.replace(BASE, **changes)
    router = Router([L1AttenuationProtocol(localizer=lambda v: None), XrayProtocol()])
    return {p.name: d for p, d in router.route(info)}


def test_axial_ct_is_accepted_by_l1_and_refused_by_xray_with_reasons() -> None:
    d = decide()
    assert d["l1_attenuation"] == Decision(True, "axial CT, 120 slices, 300 mm coverage")
    assert d["xray_fake"] == Decision(False, "modality CT is not DX/CR")


@pytest.mark.parametrize("changes, phrase", [
    (dict(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "localizer/scout image"),
    (dict(n_instances=5, n_frames=5), "only 5 slices (< 10)"),
    (dict(image_type=("DERIVED", "SECONDARY", "REFORMATTED")), "derived/secondary image"),
    (dict(image_type=("DERIVED", "PRIMARY", "MIP")), "derived/secondary image"),
    (dict(image_type=("ORIGINAL", "PRIMARY", "AXIAL", "MPR")), "derived/secondary image"),
    (dict(modality="MR"), "modality MR is not CT"),
    (dict(orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0)), "not an axial series"),
    (dict(body_part="HEAD"), "body part HEAD cannot contain the lumbar spine"),
    (dict(slice_thickness=10.0), "slice thickness 10 mm > 6 mm"),
    (dict(z_range_mm=(0.0, 12.0)), "z coverage 12 mm < 20 mm"),
    (dict(study_uid=""), "StudyInstanceUID or SeriesInstanceUID missing"),
    (dict(orientation=None), "no ImageOrientationPatient"),
])
def test_l1_refusals_name_the_reason(changes: dict, phrase: str) -> None:
    d = decide(**changes)
    assert not d["l1_attenuation"].accepted
    assert phrase in d["l1_attenuation"].reason


def test_derived_primary_axial_reconstruction_is_analysed() -> None:
    assert decide(image_type=("DERIVED", "PRIMARY", "AXIAL"))["l1_attenuation"].accepted


def test_generic_gates_apply_to_every_protocol() -> None:
    d = decide(modality="DX", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    assert all(not x.accepted and "localizer/scout" in x.reason for x in d.values())
    d = decide(modality="DX", image_type=("DERIVED", "SECONDARY"))
    assert d["xray_fake"].accepted                      # opted in to derived images
    assert "derived/secondary" in d["l1_attenuation"].reason


def test_registry_rejects_duplicate_names_and_keeps_order() -> None:
    r = Router([XrayProtocol()])
    with pytest.raises(ValueError, match="already registered"):
        r.register(XrayProtocol())
    r.register(L1AttenuationProtocol(localizer=lambda v: None))
    assert [p.name for p in r.protocols] == ["xray_fake", "l1_attenuation"]


def test_accepts_that_raises_becomes_a_refusal() -> None:
    class Broken(XrayProtocol):
        name = "broken"

        def accepts(self, info: SeriesInfo) -> Decision:
            raise RuntimeError("boom")
    (p, d), = Router([Broken()]).route(BASE)
    assert not d.accepted and d.reason == "accepts() failed: RuntimeError: boom"


def test_pipeline_records_every_protocol_when_nothing_applies(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "in", n_slices=6, rows=64, cols=64, pixel_spacing=5.0)
    assert read_series_info(ct.paths).n_instances == 6
    res = process_series(ct.paths, config=Config(), out_dir=tmp_path / "out",
                         protocols=[L1AttenuationProtocol(localizer=lambda v: None), XrayProtocol()])
    assert res.status == "skipped"
    assert res.reason == ("no protocol applies: l1_attenuation: only 6 slices (< 10): not a "
                          "volume (scout or key images?); xray_fake: modality CT is not DX/CR")
    assert [(n, a) for n, a, _ in res.decisions] == [("l1_attenuation", False), ("xray_fake", False)]
    assert res.outputs == [] and not (tmp_path / "out").exists()


def test_pipeline_geometry_decline_is_a_skip_with_reason(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "in", rows=64, cols=64, pixel_spacing=5.0, drop_slices=[12])
    res = process_series(ct.paths, config=Config(), out_dir=tmp_path / "out",
                         protocols=[L1AttenuationProtocol(localizer=ct.fake_localizer())])
    assert res.status == "skipped"
    assert res.reason.startswith("no protocol applies: l1_attenuation: series unusable: "
                                 "missing slices")


def test_real_ct_as_published_is_skipped_for_missing_uids(real_ct_dir: Path, tmp_path: Path) -> None:
    res = process_series(sorted(real_ct_dir.iterdir()), config=Config(), out_dir=tmp_path)
    assert res.status == "skipped"
    assert "StudyInstanceUID or SeriesInstanceUID missing" in res.reason
    from screener.protocols import registry
    assert [n for n, _, _ in res.decisions] == list(registry())  # every protocol records why not


class CrashingCT(XrayProtocol):
    """Accepts any CT and then crashes (a protocol bug)."""

    name = "crashing_ct"
    needs_volume = True

    def accepts(self, info: SeriesInfo) -> Decision:
        return Decision(info.modality == "CT", "CT")

    def run(self, volume, context):  # noqa: ANN001, ANN201
        raise RuntimeError(f"bug on {volume.array.shape[0]} slices")


def test_a_crashing_protocol_fails_the_job_only_when_nothing_else_succeeds(tmp_path: Path) -> None:
    ct = make_ct_series(tmp_path / "in", rows=160, cols=160, pixel_spacing=1.25, n_slices=24)
    res = process_series(ct.paths, config=Config(), out_dir=tmp_path / "a",
                         protocols=[CrashingCT()])
    assert res.status == "failed"
    assert res.reason == "crashing_ct: RuntimeError: bug on 24 slices"
    assert res.decisions == [("crashing_ct", False, "error: RuntimeError: bug on 24 slices")]
    res = process_series(ct.paths, config=Config(), out_dir=tmp_path / "b",
                         protocols=[CrashingCT(), L1AttenuationProtocol(localizer=ct.fake_localizer())])
    assert res.status == "done" and res.reason == "crashing_ct: RuntimeError: bug on 24 slices"
    assert [d[:2] for d in res.decisions] == [("crashing_ct", False), ("l1_attenuation", True)]
    assert [o.kind for o in res.outputs] == ["SR", "SC", "SEG", "SEG"]
