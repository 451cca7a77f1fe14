"""docs/conformance.md says exactly what the code negotiates and writes (issue 20, item 4).

The document's machine-readable tables (each after a ``<!-- table: NAME -->`` marker) are
compared with the SCP's accepted presentation contexts (:func:`screener.ingest.build_ae`), the
exporter's proposed contexts (:class:`screener.export.Exporter` sending a real SR and SC the
pipeline wrote) and every code in :mod:`screener.reporting.codes` and in that SR.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.sr.coding import Code

from tests.conftest import ROOT

DOC = ROOT / "docs" / "conformance.md"
_MARK = re.compile(r"<!-- table: ([\w-]+) -->")


def doc_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Every marked markdown table: name -> rows as {column: cell} (backticks stripped)."""
    out: dict[str, list[dict[str, str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _MARK.fullmatch(line.strip())
        if not m:
            continue
        header = [c.strip() for c in lines[i + 1].strip().strip("|").split("|")]
        rows = []
        for row in lines[i + 3:]:
            if not row.startswith("|"):
                break
            cells = [c.strip().strip("`") for c in row.strip().strip("|").split("|")]
            assert len(cells) == len(header), f"table {m.group(1)}: {row!r}"
            rows.append(dict(zip(header, cells)))
        out[m.group(1)] = rows
    return out


@pytest.fixture(scope="module")
def tables() -> dict[str, list[dict[str, str]]]:
    return doc_tables(DOC.read_text(encoding="utf-8"))


def _syntaxes(tables: dict[str, list[dict[str, str]]], label: str) -> list[str]:
    rows = tables[f"transfer-syntaxes-{label}"]
    assert [int(r["#"]) for r in rows] == list(range(1, len(rows) + 1))
    return [r["UID"] for r in rows]


def _contexts(tables: dict[str, list[dict[str, str]]], name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in tables[name]:
        assert r["SOP Class UID"] not in out, f"{name}: {r['SOP Class UID']} listed twice"
        out[r["SOP Class UID"]] = _syntaxes(tables, r["Transfer syntaxes"])
    return out


def test_scp_sop_classes_and_transfer_syntaxes_are_exactly_those_accepted(tables) -> None:  # noqa: ANN001
    from screener.config import load_config
    from screener.ingest import IMAGE_STORAGE_CLASSES, build_ae

    ae = build_ae(load_config(env={}, allow_any_ae=True))
    code = {str(c.abstract_syntax): [str(t) for t in c.transfer_syntax]
            for c in ae.supported_contexts}
    doc = _contexts(tables, "scp-sop-classes")
    assert set(doc) - set(code) == set(), "listed in the document, not accepted by the SCP"
    assert set(code) - set(doc) == set(), "accepted by the SCP, missing from the document"
    for uid, syntaxes in code.items():
        assert doc[uid] == syntaxes, f"{uid}: transfer syntaxes (and their order) differ"
    processed = {r["SOP Class UID"] for r in tables["scp-sop-classes"]
                 if r["Processed"].startswith("yes")}
    assert processed == set(IMAGE_STORAGE_CLASSES)
    assert len(code) == 171 and len(processed) == 9


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """Every kind of object a real pipeline run writes: l1_attenuation on a small synthetic CT, with
    an explanation map added to its finding (as l1_axial's Grad-RAMP) for the Parametric Map."""
    from screener.config import Config
    from screener.pipeline import process_series
    from tests.ct_factory import make_ct_series
    from tests.test_pmap import WithMap

    root = tmp_path_factory.mktemp("conformance")
    ct = make_ct_series(root / "in", l1_hu=97.0, noise_sd=8.0, seed=11, rows=160, cols=160,
                        pixel_spacing=1.2, n_slices=30, z_start=-36.0)
    res = process_series(ct.paths, config=Config(), out_dir=root / "job",
                         protocols=[WithMap(localizer=ct.fake_localizer())])
    assert res.status == "done" and [o.kind for o in res.outputs] == ["SR", "SC", "SEG", "SEG", "PMAP"]
    return list(res.outputs)


def test_scu_sop_classes_and_proposed_transfer_syntaxes_are_exactly_the_exporters(
        tables, outputs: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The exporter's association request for the files the pipeline wrote, captured."""
    from screener import export
    from screener.config import load_config
    from screener.db import Database

    proposed: dict[str, list[str]] = {}

    class RecordingAE:
        def __init__(self, ae_title: str) -> None:
            self.ae_title = ae_title

        def add_requested_context(self, sop_class: str, syntaxes: list[str]) -> None:
            assert sop_class not in proposed, "one presentation context per SOP class"
            proposed[str(sop_class)] = [str(t) for t in syntaxes]

        def associate(self, *_: Any, **__: Any) -> Any:
            return SimpleNamespace(is_established=False, is_rejected=True, is_aborted=False)

    monkeypatch.setattr(export, "AE", RecordingAE)
    cfg = load_config(env={}, data_dir=tmp_path / "d")
    db = Database(cfg.db_path)
    for o in outputs:
        db.queue_export(0, str(o.path), o.sop_instance_uid, "PACS@127.0.0.1:104")
    from screener.destinations import parse_destination
    counts = export.Exporter(db, cfg)._to_dicom(parse_destination("PACS@127.0.0.1:104"), db.due_exports(), 0.0)
    db.close()
    assert dict(counts) == {"retry": len(outputs)}
    assert proposed == _contexts(tables, "scu-sop-classes")
    assert {o.sop_class_uid for o in outputs} == set(proposed)


def _code_key(c: Any) -> tuple[str, str]:
    return str(c.CodingSchemeDesignator), str(c.CodeValue)


def _sr_codes(ds: pydicom.Dataset) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}

    def walk(items: Any) -> None:
        for it in items:
            for kw in ("ConceptNameCodeSequence", "ConceptCodeSequence",
                       "MeasurementUnitsCodeSequence"):
                for c in it.get(kw) or []:
                    out[_code_key(c)] = str(c.CodeMeaning)
            for kw in ("ContentSequence", "MeasuredValueSequence"):
                if kw in it:
                    walk(it[kw])
    walk([ds])
    return out


def _module_codes() -> dict[tuple[str, str], str]:
    from screener.reporting import codes

    out: dict[tuple[str, str], str] = {}
    for name, value in vars(codes).items():
        values = value.values() if isinstance(value, dict) else [value]
        for v in values:
            if isinstance(v, Code):
                out[(v.scheme_designator, v.value)] = v.meaning
            elif name.startswith("UNIT_") and isinstance(v, tuple):
                out[("UCUM", v[0])] = v[1]
    out = {k: v for k, v in out.items() if not (k[0] == "LN" and k[1] in codes.DXA_LOINC_CODES)}
    return out


def test_every_code_written_is_listed_with_its_meaning(tables, outputs: list[Any]) -> None:  # noqa: ANN001
    doc = {(r["Coding scheme"], r["Code value"]): r["Code meaning"] for r in tables["codes"]}
    sr = pydicom.dcmread(outputs[0].path)
    written = {**_sr_codes(sr), **_module_codes()}
    missing = {k: v for k, v in written.items() if k not in doc}
    assert not missing, f"codes written but not in docs/conformance.md: {missing}"
    wrong = {k: (doc[k], v) for k, v in written.items() if doc[k] != v}
    assert not wrong, f"meanings differ (document, code): {wrong}"
    from screener.reporting.codes import DXA_LOINC_CODES
    assert not any(s == "LN" and v in DXA_LOINC_CODES for s, v in doc)


def test_stated_implementation_identity_and_limits_match_the_code() -> None:
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    from screener.config import load_config
    from screener.ingest import build_ae

    text = DOC.read_text(encoding="utf-8")
    ae = build_ae(load_config(env={}, allow_any_ae=True))
    assert f"`{PYNETDICOM_IMPLEMENTATION_UID}`" in text
    assert f"`{PYNETDICOM_IMPLEMENTATION_VERSION}`" in text
    assert f"| Simultaneous associations accepted | {ae.maximum_associations};" in text
    assert (ae.acse_timeout, ae.dimse_timeout, ae.network_timeout) == (30, 60, 60)
    assert ae.require_called_aet is True and ae.maximum_pdu_size == 0
