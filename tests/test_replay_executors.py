"""``screener replay --executor processes|dask``: the same results as a serial run, failures recorded,
dead workers' series run again, a second run skips what is done."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from screener.config import load_config
from screener.db import Database
from screener.replay import replay
from screener.results import finding_records
from training.phantoms import anatomy, ct, population

#: the pipeline the workers run in these tests: the real one, with a failure and a death on cue
PROCESS = "tests.test_replay_executors:process_on_cue"


def process_on_cue(paths: list[Path], **kwargs: Any) -> Any:
    """:func:`screener.pipeline.process_series`, except for a series whose folder holds ``FAIL.txt``
    (raises) or ``DIE.txt`` (the worker process exits at once, the first time only)."""
    from screener.pipeline import process_series

    folder = Path(paths[0]).parent
    if (folder / "FAIL.txt").is_file():
        raise RuntimeError("injected failure for this series")
    if (folder / "DIE.txt").is_file() and not (folder / "died.txt").is_file():
        (folder / "died.txt").write_text(str(os.getpid()))
        os._exit(13)
    return process_series(paths, **kwargs)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three patients' 5 mm abdomen CTs (T11 to L3, about 25 slices each) and a fourth one that fails."""
    root = tmp_path_factory.mktemp("archive")
    for n, patient in enumerate(population.sample_population(4, 8)):
        scene = anatomy.build_scene(patient)
        top = scene.vertebra("T11").centroid_mm[2] + 10.0
        bottom = scene.vertebra("L3").centroid_mm[2] - 10.0
        folder = root / f"patient{n}" / "ct"
        ct.write_series(ct.render_ct(scene, "canon_ap_native", seed=8 + n, z_range=(top, bottom)), folder)
        if n == 3:
            (folder / "FAIL.txt").write_text("the test pipeline raises for this series")
    return root


def _config(data: Path) -> Any:
    return load_config(env={"SCREENER_PROTOCOLS": "l1_attenuation", "SCREENER_DEVICE": "cpu"}, data_dir=data)


def _results(data: Path) -> str:
    """The results JSON, in a fixed order (series finish in any order on several workers)."""
    recs = finding_records(Database(data / "screener.db"))
    recs.sort(key=lambda r: (r["study_uid"], r["protocol"] != "study result", r["series_uid"], r["protocol"]))
    return json.dumps(recs, indent=1, sort_keys=True, default=float)


def _statuses(rows: list[dict[str, object]]) -> dict[str, str]:
    return {str(r["series_uid"]): str(r["status"]) for r in rows}


@pytest.fixture(scope="module")
def serial(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    data = tmp_path_factory.mktemp("serial")
    rows, _ = replay(archive, _config(data), workers=1, progress=False, executor="threads", process=PROCESS)
    return data, rows


def test_serial_run_records_the_failure_and_finishes_the_rest(serial) -> None:
    data, rows = serial
    assert sorted(_statuses(rows).values()) == ["done", "done", "done", "failed"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert "RuntimeError: injected failure for this series" in str(failed[0]["reason"])
    recs = json.loads(_results(data))
    assert sum(r["protocol"] == "l1_attenuation" for r in recs) == 3
    assert len(list((data / "outbox").rglob("*.dcm"))) == 12  # an SR, an SC and 2 SEGs per done series


def test_two_process_workers_give_the_serial_results_and_resume(archive: Path, serial, tmp_path: Path) -> None:
    data = tmp_path / "data"
    rows, _ = replay(archive, _config(data), workers=2, progress=False, executor="processes", process=PROCESS)
    assert _statuses(rows) == _statuses(serial[1])
    assert _results(data) == _results(serial[0])
    jobs = Database(data / "screener.db").jobs()
    # a second run: the done series are skipped, the failed one is tried again (and fails again)
    again, _ = replay(archive, _config(data), workers=2, progress=False, executor="processes", process=PROCESS)
    assert sorted(_statuses(again).values()) == ["already done"] * 3 + ["failed"]
    assert len(Database(data / "screener.db").jobs()) == len(jobs) + 1


def test_a_dead_process_worker_has_its_series_run_again(archive: Path, tmp_path: Path) -> None:
    import shutil

    src = next(p for p in sorted(archive.glob("patient*/ct")) if not (p / "FAIL.txt").exists())
    folder = tmp_path / "in" / "ct"
    shutil.copytree(src, folder)
    (folder / "DIE.txt").write_text("the worker exits the first time it runs this series")
    data = tmp_path / "data"
    rows, _ = replay(tmp_path / "in", _config(data), workers=2, progress=False, executor="processes",
                     process=PROCESS)
    assert (folder / "died.txt").is_file()  # it did die once
    assert [r["status"] for r in rows] == ["done"]


def test_dask_local_cluster_gives_the_serial_results(archive: Path, serial, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    data = tmp_path / "data"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        rows, _ = replay(archive, _config(data), progress=False, executor="dask", scheduler=cluster.scheduler_address,
                         process=PROCESS)
    assert _statuses(rows) == _statuses(serial[1])
    assert _results(data) == _results(serial[0])


def test_executor_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one of threads, processes, dask"):
        replay(tmp_path, _config(tmp_path / "d"), executor="slurm")
    with pytest.raises(ValueError, match="--scheduler tcp://HOST:8786"):
        replay(tmp_path, _config(tmp_path / "d"), executor="dask")


def test_a_dead_dask_worker_has_its_series_run_elsewhere(archive: Path, tmp_path: Path) -> None:
    import shutil

    distributed = pytest.importorskip("distributed")
    src = next(p for p in sorted(archive.glob("patient*/ct")) if not (p / "FAIL.txt").exists())
    folder = tmp_path / "in" / "ct"
    shutil.copytree(src, folder)
    (folder / "DIE.txt").write_text("the worker exits the first time it runs this series")
    data = tmp_path / "data"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        rows, _ = replay(tmp_path / "in", _config(data), progress=False, executor="dask",
                         scheduler=cluster.scheduler_address, process=PROCESS)
    assert (folder / "died.txt").is_file()
    assert [r["status"] for r in rows] == ["done"]


def test_cli_dask_needs_a_scheduler_and_a_scheduler_needs_dask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from screener.replay import main

    (tmp_path / "in").mkdir()
    assert main([str(tmp_path / "in"), "--data-dir", str(tmp_path / "d"), "--executor", "dask"]) == 2
    assert "--executor dask needs --scheduler tcp://HOST:8786" in capsys.readouterr().err
    assert main([str(tmp_path / "in"), "--data-dir", str(tmp_path / "d"), "--scheduler", "tcp://h:8786"]) == 2
    assert "--scheduler is for --executor dask" in capsys.readouterr().err
