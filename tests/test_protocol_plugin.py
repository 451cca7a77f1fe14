"""A protocol added by a site without touching the project (issue 18): an entry point.

The test writes a tiny third-party package into a temporary folder — one
module with a :class:`~screener.protocols.Protocol` and a ``*.dist-info``
whose ``entry_points.txt`` registers it under ``screener.protocols`` — puts
the folder on ``sys.path`` (what ``pip install`` of that package would do),
and checks that the configuration accepts its name, the router routes a CT to
it, it runs, and its finding is in the SR and in the pipeline's result.
No file of the project is edited.
"""
from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pydicom
import pytest

from screener.config import ConfigError, load_config
from screener.pipeline import process_series
from screener.protocols import builtin, default_protocols, registry
from screener.series import load_volume
from tests.ct_factory import make_ct_series

PLUGIN = '''
"""A site's own protocol: the mean HU of the middle slice's central square."""
import numpy as np

from screener.findings import Finding, Measurement, RoiGeometry
from screener.protocols import Protocol, axial_ct_decision
from screener.reporting import codes


class CentreMeanProtocol(Protocol):
    name = "site_centre_mean"
    version = "0.3.1"

    def accepts(self, info):
        return axial_ct_decision(info)

    def run(self, volume, context):
        k = volume.array.shape[0] // 2
        rows, cols = volume.array.shape[1:]
        r0, c0, h = rows // 2 - 8, cols // 2 - 8, 16
        value = float(volume.array[k, r0:r0 + h, c0:c0 + h].mean())
        poly = np.array([[c0, r0], [c0 + h, r0], [c0 + h, r0 + h], [c0, r0 + h], [c0, r0]], float)
        roi = RoiGeometry(volume.sop_instance_uid(k), volume.sop_class_uid(k), poly,
                          tuple(float(v) for v in volume.index_to_patient(k, r0 + h / 2, c0 + h / 2)),
                          area_mm2=h * h * volume.spacing[1] * volume.spacing[2], slice_index=k)
        m = Measurement("centre square mean", value, codes.UNIT_HU[0], codes.ATTENUATION,
                        codes.UNIT_HU[1], derivation=codes.MEAN)
        return [Finding(protocol=self.name, protocol_version=self.version, site="L1",
                        site_code=codes.site_code("L1"), measurements=[m], roi=roi,
                        referenced_sop_instance_uids=[roi.source_sop_instance_uid])]
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "site_protocols.py").write_text(textwrap.dedent(PLUGIN))
    dist = site / "site_protocols-0.3.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: site-protocols\nVersion: 0.3.1\n")
    (dist / "entry_points.txt").write_text(
        "[screener.protocols]\nsite_centre_mean = site_protocols:CentreMeanProtocol\n"
        # a plug-in may not take a built-in's name: ignored, with a warning
        "l1_attenuation = site_protocols:CentreMeanProtocol\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield "site_centre_mean"
    sys.modules.pop("site_protocols", None)


def test_an_installed_entry_point_is_routed_run_and_reported(plugin: str, tmp_path: Path) -> None:
    reg = registry()
    assert list(reg)[:len(builtin())] == list(builtin()) and reg[plugin] == "site_protocols:CentreMeanProtocol"
    assert reg["l1_attenuation"] == builtin()["l1_attenuation"]  # not replaced
    cfg = load_config(env={"SCREENER_PROTOCOLS": f"{plugin},l1_attenuation"}, data_dir=tmp_path / "d")
    assert cfg.protocols == [plugin, "l1_attenuation"]
    paths = make_ct_series(tmp_path / "ct", n_slices=12).paths
    res = process_series(paths, config=cfg, out_dir=tmp_path / "out")
    decisions = {n: (ok, why) for n, ok, why in res.decisions}
    assert decisions[plugin][0] is True and "1 finding(s)" in decisions[plugin][1]
    [f] = [f for f in res.findings if f.protocol == plugin]
    vol = load_volume(paths)
    k, (rows, cols) = vol.array.shape[0] // 2, vol.array.shape[1:]
    expected = float(vol.array[k, rows // 2 - 8:rows // 2 + 8, cols // 2 - 8:cols // 2 + 8].mean())
    assert f.protocol_version == "0.3.1" and f.measurements[0].value == pytest.approx(expected)
    [sr] = [o for o in res.outputs if o.kind == "SR"]
    ds = pydicom.dcmread(sr.path)
    texts: list[str] = []
    ds.walk(lambda _, el: texts.append(str(el.value)) if el.VR in ("LO", "SH", "ST", "LT", "UT") else None)
    assert any(plugin in t for t in texts)  # the algorithm that produced it is named
    assert any(abs(v - f.measurements[0].value) < 0.01 for v in _numbers(ds))


def _numbers(ds: pydicom.Dataset) -> list[float]:
    """Every NUM value in an SR's content tree."""
    out = []
    for item in ds.get("ContentSequence", []):
        for mv in item.get("MeasuredValueSequence", []):
            out.append(float(mv.NumericValue))
        out += _numbers(item)
    return out


def test_without_the_package_the_name_is_unknown(tmp_path: Path) -> None:
    assert "site_centre_mean" not in registry()
    with pytest.raises(ConfigError, match="unknown site_centre_mean"):
        load_config(env={"SCREENER_PROTOCOLS": "site_centre_mean"}, data_dir=tmp_path / "d")
    with pytest.raises(ValueError, match="unknown protocol"):
        default_protocols(["site_centre_mean"])
