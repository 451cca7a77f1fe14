"""A whole model protocol added by a site, touching no file of the project (issue 18).

The test writes a third-party package into a temporary folder, the way ``pip install``
would leave it: one folder ``site_centre_net/`` holding the protocol (acceptance rule,
run, findings), its preprocessing (one function for training and inference), its
network and its training spec, and a ``*.dist-info`` whose ``entry_points.txt``
registers the three seams (``screener.protocols``, ``screener.networks``,
``screener.training_protocols``). Its recipe lives in the package too.

Then, as a site would: ``screener train`` the recipe (the fold ensemble, the bundle
with its model card naming the site's network class), route and run a CT through the
pipeline with that bundle, and find the estimate in the SR. Every project file is
byte-identical afterwards.
"""
from __future__ import annotations

import hashlib
import importlib
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest

from screener.config import load_config
from screener.pipeline import process_series
from screener.series import load_volume
from tests.ct_factory import make_ct_series

ROOT = Path(__file__).resolve().parents[1]
NAME = "site_centre_net"

INIT = f'''
"""A site's protocol: the mean HU of a CT's central square, estimated by a tiny network."""
from {NAME}.protocol import CentreNetProtocol

PROTOCOL = CentreNetProtocol
'''

PREPROCESS = '''
"""The network input: the central 16 x 16 pixels of the middle slice, HU / 1000."""
import numpy as np

SIZE = 16


def centre_crop(slice_hu):
    rows, cols = slice_hu.shape
    r0, c0 = rows // 2 - SIZE // 2, cols // 2 - SIZE // 2
    return (np.asarray(slice_hu[r0:r0 + SIZE, c0:c0 + SIZE], np.float32) / 1000.0)[None]
'''

NET = '''
import torch
from torch import nn

__all__ = ["CentreMeanNet"]


class CentreMeanNet(nn.Module):
    """Mean of the input, scaled: one weight and one bias to learn."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 1)

    def forward(self, x):
        return self.fc(x.mean(dim=(1, 2, 3))[:, None])
'''

PROTOCOL = f'''
import numpy as np

from screener.findings import Finding, Measurement, RoiGeometry
from screener.protocols import axial_ct_decision
from screener.protocols.model import ModelProtocol, model_details
from screener.reporting import codes
from {NAME}.preprocess import SIZE, centre_crop


class CentreNetProtocol(ModelProtocol):
    name = "{NAME}"
    version = "0.1.0"
    bundle_name = "{NAME}"

    def accepts(self, info):
        return axial_ct_decision(info)

    def run(self, volume, context):
        bundle = self.load_bundle(context)
        k = volume.array.shape[0] // 2
        x = centre_crop(volume.array[k])[None]
        value = float(bundle.predict(x)[0, 0]) * 1000.0
        rows, cols = volume.array.shape[1:]
        r0, c0 = rows // 2 - SIZE // 2, cols // 2 - SIZE // 2
        poly = np.array([[c0, r0], [c0 + SIZE, r0], [c0 + SIZE, r0 + SIZE], [c0, r0 + SIZE], [c0, r0]], float)
        roi = RoiGeometry(volume.sop_instance_uid(k), volume.sop_class_uid(k), poly,
                          tuple(float(v) for v in volume.index_to_patient(k, rows / 2, cols / 2)),
                          area_mm2=SIZE * SIZE * volume.spacing[1] * volume.spacing[2], slice_index=k)
        m = Measurement("centre square mean (model)", value, codes.UNIT_HU[0], codes.ATTENUATION,
                        codes.UNIT_HU[1], derivation=codes.MEAN)
        return [Finding(protocol=self.name, protocol_version=self.version, site="L1",
                        site_code=codes.site_code("L1"), measurements=[m], roi=roi,
                        referenced_sop_instance_uids=[roi.source_sop_instance_uid],
                        details=model_details(bundle))]
'''

TRAINING = f'''
import numpy as np

from training.protocols import TrainingSpec
from training.trainer import ArrayDataset
from {NAME}.preprocess import centre_crop


def build(recipe):
    """Synthetic slices of uniform tissue (the site would read its manifest here)."""
    rng = np.random.default_rng(recipe.data.seed)
    hu = rng.uniform(-100.0, 400.0, recipe.data.n)
    images = np.stack([centre_crop(np.full((32, 32), v) + rng.normal(0, 5, (32, 32))) for v in hu])
    return ArrayDataset(images=images.astype(np.float32), targets=(hu / 1000.0).astype(np.float32),
                        patient_ids=np.arange(recipe.data.n), meta={{"outputs": ["hu"], "units": ["HU"]}})


SPEC = TrainingSpec(protocol="{NAME}", paper="a site's own", dataset="{NAME}.training:build")
'''

RECIPE = f'''
protocol = "{NAME}"
variant = "cohort"
seed = 7

[network]
name = "CentreMeanNet"

[loss]
name = "mse"

[optimizer]
name = "adam"
lr = 0.05

[training]
epochs = 40
batch_size = 16
folds = 2
split = "shuffle"
val_fraction = 0.2
test_fraction = 0.2
device = "cpu"

[data]
source = "manifest"
path = "unused.csv"
n = 80
seed = 3

[bundle]
version = "0.1.0"
'''


def _project_digest() -> str:
    """One hash over every project file that git tracks (their bytes)."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    h = hashlib.sha256()
    for f in sorted(files):
        p = ROOT / f
        h.update(f.encode() + (p.read_bytes() if p.is_file() else b"<gone>"))
    return h.hexdigest()


@pytest.fixture
def site_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site-packages"
    pkg = site / NAME
    pkg.mkdir(parents=True)
    for fname, text in (("__init__.py", INIT), ("preprocess.py", PREPROCESS), ("net.py", NET),
                        ("protocol.py", PROTOCOL), ("training.py", TRAINING), ("recipe.toml", RECIPE)):
        (pkg / fname).write_text(textwrap.dedent(text))
    dist = site / f"{NAME}-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {NAME}\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[screener.protocols]\n{NAME} = {NAME}:PROTOCOL\n\n"
        f"[screener.networks]\nCentreMeanNet = {NAME}.net:CentreMeanNet\n\n"
        f"[screener.training_protocols]\n{NAME} = {NAME}.training:SPEC\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    _clear_discovery_caches()
    yield pkg
    for mod in [m for m in sys.modules if m == NAME or m.startswith(NAME + ".")]:
        sys.modules.pop(mod, None)
    _clear_discovery_caches()


def _clear_discovery_caches() -> None:
    from screener.bundles import discovered_networks
    from training.protocols import specs

    discovered_networks.cache_clear()
    specs.cache_clear()


def test_a_site_trains_runs_and_reports_its_own_model_protocol(site_package: Path, tmp_path: Path) -> None:
    from screener.protocols import registry
    from training import plan
    from training.cli import train_main

    before = _project_digest()
    assert registry()[NAME] == f"{NAME}:PROTOCOL"  # the folder's PROTOCOL, as built-ins
    assert plan.DATASET_FACTORIES[NAME] == f"{NAME}.training:build"

    models = tmp_path / "models"
    assert train_main([str(site_package / "recipe.toml"), "--out", str(models), "--no-progress"]) == 0
    card = (models / NAME / "model_card.json").read_text()
    assert f'"class": "{NAME}.net:CentreMeanNet"' in card  # the bundle names the site's network

    cfg = load_config(env={"SCREENER_PROTOCOLS": f"{NAME},l1_attenuation",
                           "SCREENER_MODELS_DIR": str(models)}, data_dir=tmp_path / "d")
    paths = make_ct_series(tmp_path / "ct", n_slices=12).paths
    res = process_series(paths, config=cfg, out_dir=tmp_path / "out")
    decisions = {n: (ok, why) for n, ok, why in res.decisions}
    assert decisions[NAME][0] is True, decisions[NAME]
    [f] = [f for f in res.findings if f.protocol == NAME]
    vol = load_volume(paths)
    k, (rows, cols) = vol.array.shape[0] // 2, vol.array.shape[1:]
    truth = float(vol.array[k, rows // 2 - 8:rows // 2 + 8, cols // 2 - 8:cols // 2 + 8].mean())
    assert f.measurements[0].value == pytest.approx(truth, abs=25.0)  # learned, not copied
    assert f.details["bundle_version"] == "0.1.0" and f.details["ensemble_size"] == 2
    [sr] = [o for o in res.outputs if o.kind == "SR"]
    texts: list[str] = []
    pydicom.dcmread(sr.path).walk(
        lambda _, el: texts.append(str(el.value)) if el.VR in ("LO", "SH", "ST", "LT", "UT") else None)
    assert any(NAME in t for t in texts)
    assert _project_digest() == before  # no file of the project was touched
