"""The driver on a local Ray cluster of 2 workers, against the same plan run in one process: the same bytes,
the same rows; a worker killed mid-setting loses nothing finished; an interrupted driver resumes."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections import deque
from pathlib import Path

import pytest
import torch

import parts.experiments.ray_executor
from parts.cli import main
from parts.data.tasks import get_task
from parts.decomposition.fingerprint import digest
from parts.errors import PartsError
from parts.experiments.driver import drive
from parts.experiments.evaluate import evaluation_plan, run_evaluation, sweep_settings
from parts.experiments.options import RunOptions
from parts.experiments.ray_executor import next_setting
from parts.experiments.results import RESULTS_CSV, read_results, text_records, write_results
from parts.experiments.runner import ModelSpec, PlannedRun
from parts.experiments.sweep import sweep

OPTIONS = RunOptions(device="cpu", batch_size=4, progress=False)


def test_without_ray_the_flag_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(parts.experiments.ray_executor, "ray", None)
    assert main(["sweep", "--tasks", "sst2", "--out", str(tmp_path), "--ray", "local"]) == 2
    err = capsys.readouterr().err
    assert "--ray needs Ray, which is not installed: pip install 'parts[ray]'" in err and len(err.strip().splitlines()) == 1


def test_free_workers_take_settings_of_the_model_they_have_loaded():
    """Scheduling alone (no Ray needed): stay on your model, else move to the one with most work per worker."""
    a, b = ModelSpec("a"), ModelSpec("b")
    sst2 = get_task("sst2")
    work = {name: PlannedRun(spec, sst2, 1, seed, Path(name)) for seed, (name, spec) in
            enumerate([("a1", a), ("a2", a), ("b1", b), ("b2", b), ("b3", b)])}
    queues = {a: deque([work["a1"], work["a2"]]), b: deque([work["b1"], work["b2"], work["b3"]])}
    assert next_setting(queues, {"w1": a, "w2": b}, "w1") is work["a1"]  # its own model first
    # A fresh worker: a has 1 left and 2 workers on it, b has 3 left and 1 worker on it.
    assert next_setting(queues, {"w1": a, "w2": a, "w3": b}, "fresh") is work["b1"]
    # Now a has 1 left and nobody on it, b 2 left and 3 workers on it.
    assert next_setting(queues, {"w2": b, "w3": b, "w4": b}, "fresh") is work["a2"]
    assert next_setting(queues, {"w1": a}, "w1") is work["b2"]  # a is finished: w1 moves to b
    assert next_setting(queues, {}, "w1") is work["b3"] and next_setting(queues, {}, "w1") is None


ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'parts[ray]'; scripts/setup.sh --dev installs it)")
from parts.experiments.ray_executor import RayExecutor  # noqa: E402
from parts.methods import MAIN_METHODS  # noqa: E402

ROWS_PER_SETTING = 7 + sum(m.beyond_paper and not m.optional for m in MAIN_METHODS)  # results.csv rows of one setting


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with room for 2 workers (one CPU each); workers import this checkout's parts."""
    checkout = str(Path(parts.__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": checkout, "OMP_NUM_THREADS": "1"}})
    # The single-process runs compared with the workers' use the workers' one thread: float sums split over
    # another number of threads can differ in the last bit, so bytes are equal only at equal thread counts.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    ray.shutdown()


def file_hashes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under root (hidden ones included) and the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def row_set(path: Path) -> list[tuple]:
    rows = [tuple(sorted(r.items())) for r in text_records(read_results(path))]
    assert len(rows) == len(set(rows)), "duplicate rows"
    return sorted(rows)


def evaluation(model_dir: Path, task_file: Path, root: Path):
    settings = sweep_settings([str(task_file)], [1, 2], [0], 6, [8])
    return evaluation_plan(ModelSpec(str(model_dir)), settings, root)


def test_a_sweep_on_two_workers_writes_the_same_bytes(cluster, tiny_model_dir, tiny_task_file, tmp_path):
    args = (str(tiny_model_dir), [str(tiny_task_file)], [1, 2], [0, 1])
    alone = sweep(*args, limit=6, out=tmp_path / "alone", options=OPTIONS)
    started: list[int] = []
    spread = sweep(*args, limit=6, out=tmp_path / "ray", options=OPTIONS,
                   executor=RayExecutor("auto", workers=2, on_start=lambda pid, work: started.append(pid)))
    assert [p.relative_to(tmp_path / "ray") for p in spread] == [p.relative_to(tmp_path / "alone") for p in alone]
    assert len(started) == 4 and len(set(started)) == 2  # both workers ran settings
    alone_files = file_hashes(tmp_path / "alone")
    assert file_hashes(tmp_path / "ray") == alone_files
    assert sum(not Path(name).name.startswith(".") for name in alone_files) == 4 * 3  # 3 files per run


def test_an_interrupted_driver_resumes_to_the_same_rows(cluster, tiny_model_dir, tiny_task_file, tmp_path, capsys):
    run_evaluation(evaluation(tiny_model_dir, tiny_task_file, tmp_path / "alone"), OPTIONS)

    plan = evaluation(tiny_model_dir, tiny_task_file, tmp_path / "ray")

    def record_then_interrupt(work, rows):  # Ctrl-C in the driver once the first setting is recorded
        made_of = work.fingerprint(OPTIONS)  # as `run_evaluation` records it
        write_results(tmp_path / "ray" / RESULTS_CSV, rows, {digest(made_of): made_of})
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        drive(plan, OPTIONS, record=record_then_interrupt, executor=RayExecutor("auto", workers=2))
    assert sum(work.is_done(OPTIONS) for work in plan) == 1
    # The command again (it joins the running cluster): only the unfinished setting runs.
    assert main(["evaluate", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1,2",
                 "--seeds", "0", "--labels", "8", "--limit", "6", "--out", str(tmp_path / "ray"), "--device", "cpu",
                 "--batch-size", "4", "--ray", "auto", "--workers", "2"]) == 0
    assert "1 of 2 settings already evaluated; 1 to go" in capsys.readouterr().out
    assert row_set(tmp_path / "ray" / RESULTS_CSV) == row_set(tmp_path / "alone" / RESULTS_CSV)
    assert len(read_results(tmp_path / "ray" / RESULTS_CSV)) == 2 * ROWS_PER_SETTING
    skip = (RESULTS_CSV,)
    assert file_hashes(tmp_path / "ray", skip) == file_hashes(tmp_path / "alone", skip)


def test_a_worker_killed_mid_setting_loses_nothing_finished(cluster, tiny_model_dir, tiny_task_file, tmp_path):
    run_evaluation(evaluation(tiny_model_dir, tiny_task_file, tmp_path / "alone"), OPTIONS)
    plan = evaluation(tiny_model_dir, tiny_task_file, tmp_path / "ray")
    started: list[tuple[int, str]] = []
    killed: list[int] = []

    def kill_when_its_test_run_is_saved(pid: int, work) -> None:
        """Kill the first worker once its setting's test decomposition is on disk (the rest still to do)."""
        started.append((pid, work.label))
        if killed:
            return
        killed.append(pid)

        def watch() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if any((tmp_path / "ray").glob(f"*/tiny/t{work.setting.template}-s0-k4-test-n6/summary.json")):
                    os.kill(pid, signal.SIGKILL)
                    return
                time.sleep(0.005)

        threading.Thread(target=watch, daemon=True).start()

    run_evaluation(plan, OPTIONS, RayExecutor("auto", workers=2, on_start=kill_when_its_test_run_is_saved))
    assert len(started) == 3 and started[2][1] == started[0][1] and started[2][0] != killed[0]  # retried elsewhere
    assert row_set(tmp_path / "ray" / RESULTS_CSV) == row_set(tmp_path / "alone" / RESULTS_CSV)
    assert not list((tmp_path / "ray").rglob(".*tmp-*"))  # no half-written folder or file
    skip = (RESULTS_CSV,)
    assert file_hashes(tmp_path / "ray", skip) == file_hashes(tmp_path / "alone", skip)


def test_workers_resolve_relative_paths_and_the_data_folder_as_the_driver_does(
        cluster, tiny_model_dir, tiny_task_file, tmp_path, monkeypatch):
    """The cluster was started in another folder, and $PARTS_DATA_DIR set after it: a relative --out still
    lands under the driver's working directory, and the workers get the driver's data folder, absolute."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PARTS_DATA_DIR", "data")
    (tmp_path / "data").mkdir()
    worker_options = parts.experiments.ray_executor.options_for_workers(OPTIONS, "cpu")
    assert worker_options.data_dir == str(tmp_path / "data") and not worker_options.progress
    runs = sweep(str(tiny_model_dir), [str(tiny_task_file)], [1], [0], limit=6, out="relative-out", options=OPTIONS,
                 executor=RayExecutor("auto", workers=1))
    assert [(tmp_path / p).is_dir() for p in runs] == [True]
    assert (tmp_path / "relative-out").is_dir() and not (Path(parts.__file__).parents[1] / "relative-out").exists()
    with pytest.raises(PartsError, match="has no folder /nowhere"):
        parts.experiments.ray_executor.SettingWorker(OPTIONS, None, "/nowhere")
