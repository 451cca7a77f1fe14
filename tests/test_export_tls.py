"""Issue 20 (operations, TLS): the exporter reaches a PACS over TLS (``tls:AE@host:port``), checks
its certificate against ``export_tls_ca`` and its host name, and presents its own certificate when
the PACS requires one.  The "PACS" is the screener's own SCP with TLS and a required client
certificate; the certificates come from a throw-away CA made with openssl."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from screener.config import ConfigError, load_config
from screener.db import Database
from screener.destinations import parse_destination
from screener.export import Exporter, client_ssl_context
from screener.ingest import start_scp
from tests.conftest import free_port, require_tool
from tests.ct_factory import make_ct_series


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True)


def make_pki(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, both
    signed by it; and a second, unrelated CA."""
    p = {n: root / f"{n}.pem" for n in ("ca", "ca_key", "other_ca", "other_key", "server", "server_key",
                                       "client", "client_key")}
    for ca, key, cn in (("ca", "ca_key", "Hospital CA"), ("other_ca", "other_key", "Someone else")):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(p[key]), "-out", str(p[ca]),
                 "-days", "1", "-subj", f"/CN={cn}")
    ext = root / "san.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for leaf, cn in (("server", "localhost"), ("client", "screener")):
        csr = root / f"{leaf}.csr"
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(p[f"{leaf}_key"]), "-out", str(csr),
                 "-subj", f"/CN={cn}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(p["ca"]), "-CAkey", str(p["ca_key"]),
                 "-CAcreateserial", "-out", str(p[leaf]), "-days", "1", "-extfile", str(ext))
    return p


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("tls")
    pki = make_pki(root)
    cfg = load_config(env={}, data_dir=root / "pacs", host="127.0.0.1", port=free_port(), ae_title="PACS",
                      tls_cert=str(pki["server"]), tls_key=str(pki["server_key"]), tls_ca=str(pki["ca"]),
                      allowed_calling_aes=["SCREENER"])
    db = Database(cfg.db_path)
    srv = start_scp(cfg, db)
    files = make_ct_series(root / "in", rows=64, cols=64, pixel_spacing=2.0, n_slices=4).paths
    try:
        yield {"pki": pki, "port": cfg.port, "db": db, "files": files, "root": root}
    finally:
        srv.stop()
        db.close()


def _send(pacs: dict, name: str, dest: str, **tls: Path) -> tuple[dict[str, int], list[dict]]:
    cfg = load_config(env={}, data_dir=pacs["root"] / name, **{k: str(v) for k, v in tls.items()})
    db = Database(cfg.db_path)
    try:
        path = pacs["files"][len(name) % len(pacs["files"])]
        import pydicom
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        db.queue_export(0, str(path), uid, parse_destination(dest).key)
        counts = Exporter(db, cfg).run_once()
        return counts, list(db.iter_table("exports"))
    finally:
        db.close()


def test_results_reach_a_tls_pacs_with_the_hospital_ca_and_a_client_certificate(pacs) -> None:  # noqa: ANN001
    pki = pacs["pki"]
    dest = f"tls:PACS@localhost:{pacs['port']}"
    counts, rows = _send(pacs, "ok", dest, export_tls_ca=pki["ca"], export_tls_cert=pki["client"],
                         export_tls_key=pki["client_key"])
    assert counts == {"sent": 1}, rows
    assert rows[0]["destination"] == dest
    stored = {r["sop_instance_uid"] for r in pacs["db"].iter_table("instances")}
    assert rows[0]["sop_instance_uid"] in stored


@pytest.mark.parametrize("case", ["no client certificate", "another CA", "plain TCP"])
def test_an_unverified_or_plain_association_is_retried_with_its_reason(pacs, case: str) -> None:  # noqa: ANN001
    pki = pacs["pki"]
    dest = f"tls:PACS@localhost:{pacs['port']}"
    tls = {"no client certificate": {"export_tls_ca": pki["ca"]},
           "another CA": {"export_tls_ca": pki["other_ca"], "export_tls_cert": pki["client"],
                          "export_tls_key": pki["client_key"]},
           "plain TCP": {}}[case]
    if case == "plain TCP":
        dest = f"PACS@localhost:{pacs['port']}"
    counts, rows = _send(pacs, case.replace(" ", "-"), dest, **tls)
    assert counts == {"retry": 1}, rows
    assert "association with" in rows[0]["last_error"] and "failed" in rows[0]["last_error"]


def test_destination_forms_and_config_errors(tmp_path: Path) -> None:
    d = parse_destination("tls:PACS@pacs.example.org:2762")
    assert (d.tls, d.ae_title, d.host, d.port, d.key) == (True, "PACS", "pacs.example.org", 2762,
                                                          "tls:PACS@pacs.example.org:2762")
    assert parse_destination({"ae_title": "PACS", "host": "h", "port": 104, "tls": "true"}).key == "tls:PACS@h:104"
    assert not parse_destination("PACS@h:104").tls
    with pytest.raises(ValueError, match="tls must be true or false"):
        parse_destination({"ae_title": "PACS", "host": "h", "port": 104, "tls": "maybe"})
    with pytest.raises(ConfigError, match="export_tls_cert and export_tls_key"):
        load_config(env={}, data_dir=tmp_path / "d", export_tls_cert="c.pem")
    cfg = load_config(env={}, data_dir=tmp_path / "d", export_tls_ca=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="export TLS: cannot load"):
        client_ssl_context(cfg)
    assert cfg.redacted()["export_tls_key"] == ""
