"""Two commands at once on one output folder, as real processes: they end as they would one after the other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from parts import io
from parts.decomposition.runs import DecompositionRun

# `parts ARGV`, whose first save of a run waits (up to 5 s) until the other command has reached its own: the two
# commands meet at the moment that matters, however their start-up times differ.
MEET_AT_THE_FIRST_SAVE = """
import os, sys, time
from pathlib import Path
from parts.cli import main
from parts.decomposition.runs import DecompositionRun

meeting, save, first = os.environ.get("MEETING"), DecompositionRun.save, []

def meet_then_save(self, *args, **kwargs):
    if meeting and not first:
        meeting_folder = Path(meeting)
        first.append(True)
        (meeting_folder / str(os.getpid())).touch()
        deadline = time.monotonic() + 5  # the other may be waiting for this one's run (it then reuses it)
        while len(list(meeting_folder.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
    return save(self, *args, **kwargs)

DecompositionRun.save = meet_then_save
sys.exit(main(sys.argv[1:]))
"""


def start(argv: list[str], meeting: Path | None = None) -> subprocess.Popen:
    """`parts ARGV` in a process of its own; with `meeting`, it meets the other process given it at its first save."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if meeting is not None:
        meeting.mkdir(exist_ok=True)
        env["MEETING"] = str(meeting)
    return subprocess.Popen([sys.executable, "-c", MEET_AT_THE_FIRST_SAVE, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    results = []
    for process in processes:
        _, err = process.communicate(timeout=600)
        results.append((process.returncode, err))
    return results


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root` but lock files, by relative path (staging folders would show here too)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(io.LOCK_SUFFIX)}


def test_two_decompositions_into_one_folder_the_second_refuses(tiny_model_dir, tiny_task_file, tmp_path):
    out = tmp_path / "run"
    argv = ["decompose", "--model", str(tiny_model_dir), "--task", str(tiny_task_file), "--limit", "6",
            "--device", "cpu", "--out", str(out)]
    meeting = tmp_path / "meeting"
    results = finish([start([*argv, "--seed", "0"], meeting), start([*argv, "--seed", "1"], meeting)])
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "holds a run of other settings (seed" in refused and "--overwrite" in refused
    kept_seed = [seed for seed, (code, _) in enumerate(results) if code == 0][0]
    assert DecompositionRun.load(out).prompts.seed == kept_seed  # the run of the command that succeeded, whole
    assert not [p for p in tmp_path.iterdir() if io.STAGING in p.name]


def test_two_identical_sweeps_into_one_folder_both_finish_with_the_same_files(tiny_model_dir, tiny_task_file,
                                                                              tmp_path):
    argv = ["sweep", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1,2",
            "--seeds", "0,1", "--limit", "4", "--device", "cpu", "--batch-size", "4"]
    meeting = tmp_path / "meeting"
    results = finish([start([*argv, "--out", str(tmp_path / "both")], meeting),
                      start([*argv, "--out", str(tmp_path / "both")], meeting)])
    assert [code for code, _ in results] == [0, 0], results
    # The reference in a process of its own too: the same threads, so the same float32 sums.
    assert finish([start([*argv, "--out", str(tmp_path / "alone")])])[0][0] == 0
    together, alone = files(tmp_path / "both"), files(tmp_path / "alone")
    assert len([name for name in alone if name.endswith("summary.json")]) == 4
    assert together == alone
