"""Configuration: defaults, TOML, environment and flag precedence, validation, deploy files."""
from __future__ import annotations

import re
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from screener.config import Config, ConfigError, Destination, load_config
from screener.worker import export_destinations
from tests.conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEPLOY = ROOT / "deploy"


def test_defaults_without_file_or_env() -> None:
    c = load_config(env={})
    assert c.data_dir == Path("screener-data")
    assert (c.ae_title, c.host, c.port) == ("SCREENER", "0.0.0.0", 11112)
    assert c.quiet_seconds == 30.0 and c.min_free_mb == 500 and c.workers == 1
    assert c.destinations == [] and export_destinations(c) == ["outbox"]
    assert c.db_path == Path("screener-data/screener.db")
    assert c.tmp_dir.parent == c.store_dir.parent  # same file system: atomic rename


def test_env_overrides_and_destination_parsing() -> None:
    c = load_config(env={"SCREENER_PORT": "11113", "SCREENER_QUIET_SECONDS": "1.5",
                         "SCREENER_ALLOWED_CALLING_AES": "CT1, CT2 ,",
                         "SCREENER_DESTINATIONS": "PACS@10.0.0.5:104,ARCH@h.example:11112",
                         "SCREENER_DATA_DIR": "/tmp/x"})
    assert c.port == 11113 and c.quiet_seconds == 1.5
    assert c.allowed_calling_aes == ["CT1", "CT2"]
    assert c.destinations == [Destination("PACS", "10.0.0.5", 104),
                              Destination("ARCH", "h.example", 11112)]
    assert export_destinations(c) == ["PACS@10.0.0.5:104", "ARCH@h.example:11112"]
    assert c.data_dir == Path("/tmp/x")


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text('[network]\nport = 2000\nae_title = "FROMFILE"\n[processing]\nworkers = 3\n')
    c = load_config(f, env={"SCREENER_PORT": "3000"})
    assert (c.port, c.ae_title, c.workers) == (3000, "FROMFILE", 3)
    c = load_config(f, env={"SCREENER_PORT": "3000"}, port=4000, ae_title=None)
    assert (c.port, c.ae_title) == (4000, "FROMFILE")


@pytest.mark.parametrize("text, env, match", [
    ("colour = 'blue'\n", {}, "unknown config key 'colour'"),
    ("port = 70000\n", {}, "'port' must be 1-65535"),
    ("tls_cert = 'a.pem'\n", {}, "needs both tls_cert and tls_key"),
    ("", {"SCREENER_WORKERS": "many"}, "'workers'"),
    ("destinations = ['PACS-no-port']\n", {}, "AE@host:port"),
    ("port = \n", {}, "not valid TOML"),
])
def test_invalid_configuration_names_the_key(tmp_path: Path, text: str, env: dict[str, str],
                                             match: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(match) if "'" in match else match):
        load_config(f, env=env)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_example_config_documents_every_key_and_loads() -> None:
    text = (DEPLOY / "screener.toml").read_text()
    raw = tomllib.loads(text)
    flat = {k for v in raw.values() if isinstance(v, dict) for k in v} | \
        {k for k, v in raw.items() if not isinstance(v, dict)}
    for f in fields(Config):
        if f.name == "destinations":  # an array of tables, shown commented out
            assert "[[destinations]]" in text and "SCREENER_DESTINATIONS" in text
            continue
        assert f.name in flat, f"deploy/screener.toml lacks key {f.name}"
        # every key carries a comment in the lines just above it
        idx = text.index(f"\n{f.name} =")
        assert "#" in text[max(0, idx - 400):idx], f"{f.name} has no comment"
    c = load_config(DEPLOY / "screener.toml", env={})
    defaults = Config()
    for f in fields(Config):
        if f.name not in ("data_dir", "models_dir"):
            assert getattr(c, f.name) == getattr(defaults, f.name), f.name
    assert c.data_dir == Path("/var/lib/screener")
    assert c.models_dir == Path("/opt/screener/models")  # a pip-installed service has no checkout
    # an uncommented destination table parses
    enabled = text.replace("\n# [[destinations]]\n", "\n[[destinations]]\n").replace(
        '# name = "pacs"', 'name = "pacs"').replace('# ae_title = "PACS"', 'ae_title = "PACS"') \
        .replace('# host = "10.0.0.5"', 'host = "10.0.0.5"').replace("# port = 104", "port = 104")
    assert load_config_text(enabled).destinations == [Destination("PACS", "10.0.0.5", 104, "pacs")]


def load_config_text(text: str) -> Config:
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write(text)
    try:
        return load_config(fh.name, env={})
    finally:
        Path(fh.name).unlink()


def test_systemd_unit_is_hardened() -> None:
    unit = (DEPLOY / "screener.service").read_text()
    for line in ("User=screener", "ProtectSystem=strict", "ReadWritePaths=/var/lib/screener",
                 "PrivateTmp=yes", "NoNewPrivileges=yes", "Restart=on-failure",
                 "Environment=SCREENER_DATA_DIR=/var/lib/screener", "ExecStart="):
        assert re.search(rf"^{re.escape(line)}", unit, re.M), line
    assert "serve" in re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)  # type: ignore[union-attr]


def test_redacted_config_hides_the_tls_key() -> None:
    c = load_config(env={}, tls_cert="/etc/c.pem", tls_key="/etc/secret-key.pem")
    r = c.redacted()
    assert r["tls_key"] == "<set>" and "secret" not in str(r)
    assert r["tls_cert"] == "/etc/c.pem"


def test_serve_with_invalid_config_exits_2(tmp_path: Path) -> None:
    from screener.serve import main
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2


def test_access_policy_needs_senders_or_an_explicit_allow_any() -> None:
    with pytest.raises(ConfigError, match="allowed_calling_aes is empty.*--allow-any-ae"):
        load_config(env={}).check_access_policy()
    load_config(env={"SCREENER_ALLOWED_CALLING_AES": "MYPACS"}).check_access_policy()
    cfg = load_config(env={"SCREENER_ALLOW_ANY_AE": "true"})
    assert cfg.allow_any_ae is True
    cfg.check_access_policy()
    assert load_config(env={}, allow_any_ae=True).allow_any_ae is True


@pytest.mark.parametrize("value", ['["CT1","CT2"]', '[ "CT1", "CT2" ]', "CT1,CT2", " CT1 , CT2 ,"])
def test_list_settings_take_the_json_list_and_the_comma_forms(value: str) -> None:
    """Issue 20: ``SCREENER_ALLOWED_CALLING_AES='["A"]'`` was one AE title ``["A"]``."""
    c = load_config(env={"SCREENER_ALLOWED_CALLING_AES": value,
                         "SCREENER_PROTOCOLS": value.replace("CT1", "l1_attenuation")
                         .replace("CT2", "hip_xray")})
    assert c.allowed_calling_aes == ["CT1", "CT2"]
    assert c.protocols == ["l1_attenuation", "hip_xray"]


def test_destinations_take_the_json_list_form_too() -> None:
    c = load_config(env={"SCREENER_DESTINATIONS": '["PACS@10.0.0.5:104", "ARCH@h:11112"]'})
    assert c.destinations == [Destination("PACS", "10.0.0.5", 104), Destination("ARCH", "h", 11112)]


def test_a_broken_json_list_names_the_key_and_both_forms() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={"SCREENER_ALLOWED_CALLING_AES": '["CT1",'})
    assert str(exc.value) == ("config key 'allowed_calling_aes': '[\"CT1\",' starts with '[' but "
                              "is not a JSON list (Expecting value); write it as '[\"A\", \"B\"]' "
                              "or as A,B")


def test_config_path_is_the_flag_then_the_environment_then_etc(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from screener.config import find_config_path
    etc = tmp_path / "screener.toml"
    monkeypatch.setattr("screener.config.DEFAULT_CONFIG_PATH", etc)
    assert find_config_path(None, env={}) is None
    etc.write_text("")
    assert find_config_path(None, env={}) == etc
    assert find_config_path(None, env={"SCREENER_CONFIG": "/x.toml"}) == Path("/x.toml")
    assert find_config_path("/y.toml", env={"SCREENER_CONFIG": "/x.toml"}) == Path("/y.toml")


def test_systemd_unit_lets_the_service_open_the_gpu_and_nothing_else() -> None:
    """Issue 20: PrivateDevices=yes hid /dev/nvidia*, so device = "auto" silently ran on the CPU."""
    unit = (DEPLOY / "screener.service").read_text()
    for line in ("PrivateDevices=no", "DevicePolicy=closed", "DeviceAllow=char-nvidia* rw"):
        assert re.search(rf"^{re.escape(line)}$", unit, re.M), line
    assert not re.search(r"^PrivateDevices=yes", unit, re.M)


def test_backup_and_purge_timers_run_the_documented_commands() -> None:
    backup = (DEPLOY / "screener-backup.service").read_text()
    assert '/usr/bin/sqlite3 /var/lib/screener/screener.db ".backup $$out"' in backup
    assert "pragma integrity_check" in backup and "User=screener" in backup
    purge = (DEPLOY / "screener-purge.service").read_text()
    assert re.search(r"^ExecStart=/opt/screener/bin/screener purge --older-than 30 ", purge, re.M)
    for timer in ("screener-backup.timer", "screener-purge.timer"):
        text = (DEPLOY / timer).read_text()
        assert "OnCalendar=*-*-*" in text and "Persistent=true" in text, timer
