"""Issue 20 item 2: the femoral heads femur_coronal located, as masks for the outlines SEG
(:mod:`screener.preprocess.femoral_head`), against the phantom's truth."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from screener.preprocess.femoral_head import femoral_head_layers, head_radius
from screener.protocols.femur_coronal.preprocess import locate_femoral_heads
from screener.series import load_volume


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from tests.test_model_protocols_daemon import _ct

    return load_volume(_ct(tmp_path_factory.mktemp("femur")))


def test_each_head_is_masked_inside_its_true_sphere_and_not_the_acetabulum(ct) -> None:  # noqa: ANN001
    from training.phantoms.anatomy import build_scene
    from training.phantoms.population import make_patient

    scene = build_scene(make_patient(11, 3))  # the patient tests' _ct renders
    layers = femoral_head_layers(ct, locate_femoral_heads(ct))
    assert [x.label for x in layers] == ["right femoral head", "left femoral head"]
    index = {ct.sop_instance_uid(k): k for k in range(ct.array.shape[0])}
    for layer, side in zip(layers, ("R", "L")):
        centre = np.asarray(scene.femoral_heads[side])
        radius = scene.femoral_necks[side]["head_radius"]
        inside = core = 0
        for uid, plane in layer.planes.items():
            k = index[uid]
            jj, ii = np.mgrid[0:plane.shape[0], 0:plane.shape[1]]
            d = np.asarray(ct.direction, float)
            p = ct.index_to_patient(k, 0, 0)[None, None, :] + (ii * ct.spacing[2])[..., None] * d[:, 0] \
                + (jj * ct.spacing[1])[..., None] * d[:, 1]
            dist = np.linalg.norm(p - centre, axis=-1)
            # nothing beyond the true head (a 1 mm pixel's diagonal, the locator's offset, partial
            # volume at the 120 HU threshold) ...
            assert dist[plane].max() < radius + 2.5, (side, k, dist[plane].max(), radius)
            # ... and none of the acetabulum around it
            pelvis = scene.structure_mask("pelvis", p[..., 0][plane], p[..., 1][plane], p[..., 2][plane])
            assert pelvis.mean() < 0.02, (side, k, pelvis.mean())
            inside += int(plane.sum())
            core += int((dist < radius - 3.0).sum())
            if (dist < radius - 3.0).any():  # the head's core is masked on every slice through it
                assert plane[dist < radius - 3.0].mean() > 0.9, (side, k)
        assert inside > core > 0
        # the slices it spans are those the true head crosses
        zs = sorted(ct.index_to_patient(index[u], 0, 0)[2] for u in layer.planes)
        assert zs[0] >= centre[2] - radius - 5.0 and zs[-1] <= centre[2] + radius + 5.0


def test_no_head_without_a_joint_space() -> None:
    # solid bone all round (a head fused into its socket, or a misplaced centre in the pelvis): no radius
    dist = np.abs(np.linspace(0.0, 40.0, 4001))
    assert head_radius(np.ones_like(dist, dtype=bool), dist) is None
    # a head of radius 22 mm, a 2 mm joint space, bone beyond: found at the joint space
    bone = (dist < 22.0) | (dist >= 24.0)
    assert head_radius(bone, dist) == pytest.approx(22.0, abs=0.5)


def test_a_femur_finding_carries_its_heads_into_the_outlines_seg(tmp_path: Path) -> None:
    from screener.reporting.seg import build_seg
    from screener.findings import Finding
    import pydicom

    from tests.test_model_protocols_daemon import _ct

    files = _ct(tmp_path / "ct")
    vol = load_volume(files)
    f = Finding("femur_coronal", "1", "proximal femur", [])
    f.layers = femoral_head_layers(vol, locate_femoral_heads(vol))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    seg = build_seg([f], headers, content="layers")
    assert seg is not None
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["right femoral head (femur_coronal)",
                                                             "left femoral head (femur_coronal)"]
