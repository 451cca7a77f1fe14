"""The command line (issue 20, item 6): one-line errors with non-zero exits, ``status`` finding
the service's data directory, the called-AE check, broken pipes, ``--log-format``."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from screener import cli
from screener.config import Config, load_config
from screener.db import Database
from tests.conftest import ROOT, free_port, require_tool
from tests.daemon_helpers import dcmtk_env


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SCREENER_* setting of the developer's shell, and no site configuration file."""
    for k in list(os.environ):
        if k.startswith("SCREENER_"):
            monkeypatch.delenv(k)
    monkeypatch.setattr("screener.config.DEFAULT_CONFIG_PATH", tmp_path / "etc" / "screener.toml")
    # "" = unset; the dispatcher sets it from --log-format, and monkeypatch restores it after
    monkeypatch.setenv("SCREENER_LOG_FORMAT", "")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SCREENER_")}



def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m screener ARGS`` as a user would run it."""
    return subprocess.run([sys.executable, "-m", "screener", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=120)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------ replay
def test_replay_of_an_empty_folder_says_so_on_one_line_and_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = cli.main(["replay", str(empty), "--data-dir", str(tmp_path / "d"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert _last_line(err) == (f"screener replay: no DICOM files in {empty}: 0 files seen (the "
                               "folder is empty); point replay at the folder that holds the "
                               "exported .dcm files")
    assert "Traceback" not in err


def test_replay_of_a_folder_of_jpegs_counts_them_and_exits_2(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        (folder / name).write_bytes(b"\xff\xd8\xff\xe0 not a DICOM file")
    r = _run("replay", str(folder), "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2
    assert _last_line(r.stderr) == (
        f"screener replay: no DICOM files in {folder}: 4 files seen, 4 not DICOM (a.jpg, b.jpg, "
        "c.jpg, ...); export the studies as DICOM (.dcm, or files with the DICM prefix)")
    assert r.stdout == "" and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------ --data-dir
@pytest.mark.parametrize("command", [["replay", "{folder}"], ["status"], ["results"]])
def test_data_dir_that_is_a_file_is_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    (tmp_path / "in").mkdir()
    args = [a.replace("{folder}", str(tmp_path / "in")) for a in command]
    rc = cli.main([*args, "--data-dir", str(afile)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (f"screener {command[0]}: data directory {afile} is a file, not a folder; pass "
                   "--data-dir (or SCREENER_DATA_DIR, or data_dir in the config) a writable "
                   "folder\n")


def test_data_dir_that_cannot_be_created_is_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A path below a regular file cannot be created, even by root (who bypasses modes)."""
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    (tmp_path / "in").mkdir()
    rc = cli.main(["replay", str(tmp_path / "in"), "--data-dir", str(afile / "sub")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (f"screener replay: data directory {afile / 'sub'} cannot be used: Not a "
                   f"directory ({afile / 'sub'}); pass --data-dir (or SCREENER_DATA_DIR, or "
                   "data_dir in the config) a writable folder\n")


def test_serve_with_a_data_dir_that_is_a_file_exits_2_without_traceback(tmp_path: Path) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    r = _run("serve", "--data-dir", str(afile), "--port", str(free_port()), "--allow-any-ae",
             "--log-format", "json")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    [line] = [json.loads(ln) for ln in r.stderr.splitlines() if ln.startswith("{")]
    assert line["event"] == "invalid configuration" and line["level"] == "error"
    assert line["error"].startswith(f"data directory {afile} is a file, not a folder")


# ------------------------------------------------------------------------------ status
def _site_config(tmp_path: Path, data_dir: Path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    f = etc / "screener.toml"
    f.write_text(f'[storage]\ndata_dir = "{data_dir}"\n')
    return f


def test_status_outside_the_data_dir_finds_it_through_the_site_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "var-lib-screener"
    site = _site_config(tmp_path, data)  # at DEFAULT_CONFIG_PATH (see _clean_env)
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # the service has not run yet: no database -> exit 1, and the line says where it looked
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert err == (f"screener status: no database at {data / 'screener.db'}: the service has "
                   "not started with this data directory yet, or uses another one (check "
                   "data_dir in the config and SCREENER_DATA_DIR in its unit)\n")
    db = Database(data / "screener.db")
    db.record_instance(sop_instance_uid="1.2.3.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                       study_uid="1.2", series_uid="1.2.3", path=str(data / "x.dcm"))
    db.enqueue_job("1.2.3", source="scp")
    db.close()
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"data directory {data} (config: {site})"
    assert out[2] == "jobs     pending 1"
    assert not (elsewhere / "screener-data").exists()  # nothing created where it was run
    assert cli.main(["status", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["jobs"] == {"pending": 1} and counts["data_dir"] == str(data)


def test_status_without_any_configuration_says_how_to_point_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["status"]) == 1
    assert capsys.readouterr().err == (
        f"screener status: no database at {tmp_path / 'screener-data' / 'screener.db'}: no "
        "service configuration found (no --config, $SCREENER_CONFIG or "
        "/etc/screener/screener.toml): pass --config FILE or --data-dir DIR\n")


def test_status_help_documents_the_exit_statuses() -> None:
    r = _run("status", "--help")
    assert r.returncode == 0
    assert "1  no database in that data directory" in r.stdout
    assert "/etc/screener/screener.toml" in r.stdout


def test_status_of_a_corrupt_database_is_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "screener.db").write_bytes(b"this is not an SQLite file" * 100)
    assert cli.main(["status", "--data-dir", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"screener status: cannot read the database at {d / 'screener.db'}: "
                          "file is not a database;")
    assert err.count("\n") == 1


# ------------------------------------------------------------------------------ dispatcher
def test_no_command_prints_usage_on_stderr_and_exits_2() -> None:
    r = _run()
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("usage: screener COMMAND [options]\n")
    assert "  status    show queue, jobs and exports" in r.stderr


def test_help_into_a_closed_pipe_ends_quietly() -> None:
    """``screener -h | head -1``: the reader is gone before the usage is written."""
    for args in (["-h"], ["serve", "--help"], ["status", "--help"]):
        p = subprocess.Popen([sys.executable, "-m", "screener", *args], cwd=ROOT, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None and p.stderr is not None
        p.stdout.close()  # like head after its line
        err = p.stderr.read().decode()
        rc = p.wait(60)
        # argparse's own help printer swallows the error (0); ours ends with 128 + SIGPIPE
        assert rc == (cli.EXIT_BROKEN_PIPE if args == ["-h"] else rc) and rc in (0, 141), rc
        assert err == "", (args, err)
    r = subprocess.run(f"'{sys.executable}' -m screener -h | head -1", shell=True, cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=60)
    assert r.stdout == "usage: screener COMMAND [options]\n" and r.stderr == ""


def test_unknown_log_format_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--log-format", "xml"]) == 2
    assert capsys.readouterr().err == ("screener status: log format 'xml' is not one of "
                                       "human, json\n")


def test_log_format_is_taken_out_for_every_command() -> None:
    assert cli._pop_log_format(["--n", "2", "--log-format=json", "--out", "x"]) == (
        ["--n", "2", "--out", "x"], "json")
    assert cli._pop_log_format(["a", "--log-format", "console", "--", "--log-format"]) == (
        ["a", "--", "--log-format"], "human")
    with pytest.raises(ValueError, match="needs a value"):
        cli._pop_log_format(["--log-format"])


# ------------------------------------------------------------------------------ --log-format
@pytest.mark.parametrize("fmt", ["json", "human"])
def test_replay_log_format(tmp_path: Path, fmt: str) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8")
    r = _run("replay", str(folder), "--data-dir", str(tmp_path / "d"), "--log-format", fmt)
    [scanned] = [ln for ln in r.stderr.splitlines() if "replay.scanned" in ln]
    if fmt == "json":
        ev = json.loads(scanned)
        assert (ev["event"], ev["not_dicom"], ev["series"]) == ("replay.scanned", 1, 0)
    else:
        assert not scanned.startswith("{")
        assert "[info     ] replay.scanned" in scanned and "not_dicom=1" in scanned


def test_default_log_format_is_human_on_a_terminal_and_json_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from screener.logs import resolve_log_format

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_log_format(None, Tty(), env={}) == "human"
    assert resolve_log_format(None, io.StringIO(), env={}) == "json"
    assert resolve_log_format(None, Tty(), env={"SCREENER_LOG_FORMAT": "json"}) == "json"
    assert resolve_log_format("console", io.StringIO(), env={}) == "human"


def test_log_lines_are_written_above_a_progress_bar_not_into_it() -> None:
    from tqdm import tqdm

    from screener.logs import ProgressAwareStream

    out = io.StringIO()
    stream = ProgressAwareStream(out)
    bar = tqdm(total=3, file=out, desc="replay", ascii=True)
    bar.update(1)
    stream.write('{"event": "replay.scanned"}')
    stream.write("\n")
    bar.update(1)
    bar.close()
    text = out.getvalue()
    # the bar is cleared first (carriage return), the line follows whole, then the bar again
    i = text.index('{"event": "replay.scanned"}\n')
    assert text[i - 1] == "\r" and "replay:  67%" in text[i:]
    plain = io.StringIO()
    ProgressAwareStream(plain).write("a\nb")  # no bar: straight through, whole lines only
    assert plain.getvalue() == "a\n"


# ------------------------------------------------------------------------------ called AE
@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[Config, Any]]:
    from screener.ingest import start_scp
    cfg = load_config(env={}, data_dir=tmp_path / "data", host="127.0.0.1", port=free_port(),
                      min_free_mb=1, allowed_calling_aes=["TESTSCU"], quiet_seconds=3600)
    db = Database(cfg.db_path)
    srv = start_scp(cfg, db)
    yield cfg, srv
    srv.stop()
    db.close()


def test_wrong_called_ae_is_rejected_with_called_ae_not_recognised(
        scp: tuple[Config, Any]) -> None:
    """A-ASSOCIATE-RJ: result 1 (rejected-permanent), source 1 (service user), reason 7
    (called AE title not recognised) — PS3.8 9.3.4 — from a real DCMTK and pynetdicom SCU."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    cfg, _ = scp
    echoscu = require_tool("echoscu")
    ok = subprocess.run([echoscu, "-aet", "TESTSCU", "-aec", "SCREENER", "127.0.0.1",
                         str(cfg.port)], capture_output=True, text=True, timeout=30,
                        env=dcmtk_env())
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([echoscu, "-v", "-aet", "TESTSCU", "-aec", "WRONG", "127.0.0.1",
                          str(cfg.port)], capture_output=True, text=True, timeout=30,
                         env=dcmtk_env())
    assert bad.returncode != 0
    assert "Called AE Title Not Recognized" in bad.stdout + bad.stderr
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", cfg.port, ae_title="WRONG")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)


def test_log_format_applies_to_commands_that_do_not_list_it(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``phantom``, ``train`` and ``evaluate`` have their own parsers: the dispatcher takes the
    option out and configures the log lines for them."""
    import structlog

    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        structlog.get_logger("training").info("cohort written", patients=1)
        return 0

    monkeypatch.setattr("training.phantoms.cli.main", fake_main)
    assert cli.main(["phantom", "--n", "1", "--log-format", "json"]) == 0
    assert seen == [["--n", "1"]]
    [line] = capsys.readouterr().err.splitlines()
    assert json.loads(line)["event"] == "cohort written" and json.loads(line)["patients"] == 1


def test_status_without_permission_on_the_data_dir_says_whom_to_run_as(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An operator's own account cannot look into /var/lib/screener (0750 screener). Root, who
    runs the tests, bypasses modes: the refusal is simulated where stat() would raise it."""
    d = tmp_path / "var-lib-screener"
    d.mkdir()

    is_file = Path.is_file

    def denied(self: Path) -> bool:
        if self.parent == d:
            raise PermissionError(13, "Permission denied", str(self))
        return is_file(self)

    monkeypatch.setattr(Path, "is_file", denied)
    assert cli.main(["status", "--data-dir", str(d)]) == 2
    assert capsys.readouterr().err == (
        f"screener status: cannot read the database at {d / 'screener.db'}: Permission denied; "
        "run as the service user (sudo -u screener screener status) or root\n")
