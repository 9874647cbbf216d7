"""What `kdistill run` writes where: results on stdout (so `kdistill run ... > log` keeps them), progress and
warnings on stderr; the libraries' own progress bars off unless asked for; evaluations show their progress."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import cli_result, engine_for, tiny_recipe, write_recipe
from kdistill.core import summary


def test_results_go_to_stdout_and_progress_to_stderr(tiny_assets, tmp_path):
    raw = tiny_recipe(tiny_assets, tmp_path / "run", steps=4, save_every=1, keep_checkpoints=2)
    code, out, err = cli_result("run", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    assert "final student:" in out and "val/student_ppl" in out
    assert "final student:" not in err and "val/student_ppl" not in err
    assert "distilling" in err and "distilling" not in out
    # the run folder's size, and what keep_checkpoints left: 4 saves, the newest 2 kept
    disk = json.loads((tmp_path / "run" / "summary.json").read_text())["disk"]
    assert sorted(disk["checkpoints"]) == ["step-00000003", "step-00000004"] and disk["checkpoints_saved"] == 4
    on_disk = sum(f.stat().st_size for f in (tmp_path / "run").rglob("*") if f.is_file() and f.name != "summary.json")
    assert abs(on_disk - disk["total_bytes"]) < 4096  # all but what is written after the count (summary.json, the log's end)
    line = " ".join(out.split())  # rich wraps long lines
    assert f"run folder {tmp_path / 'run'}: {summary.human_bytes(disk['total_bytes'])}" in line
    assert "2 checkpoints kept (train.keep_checkpoints 2; 2 older removed): step-00000003" in line


LEAK = "import kdistill.core.summary as s; s.quiet_libraries(); from tqdm.auto import tqdm; list(tqdm(range(3), desc='LIBRARYBAR'))"


def test_library_progress_bars_are_quiet_unless_verbose(monkeypatch):
    monkeypatch.delenv(summary.VERBOSE_ENV, raising=False)
    quiet = subprocess.run([sys.executable, "-c", LEAK], capture_output=True, text=True, check=True)
    assert "LIBRARYBAR" not in quiet.stderr + quiet.stdout
    monkeypatch.setenv(summary.VERBOSE_ENV, "1")
    verbose = subprocess.run([sys.executable, "-c", LEAK], capture_output=True, text=True, check=True)
    assert "LIBRARYBAR" in verbose.stderr


def test_evaluation_reports_progress_in_batches(tiny_assets, tmp_path, monkeypatch):
    raw = tiny_recipe(tiny_assets, tmp_path / "run", eval_batch_size=1)
    engine = engine_for(raw)
    engine.build()
    reported = []
    original = summary.EvalLine.report

    def record(self, done, total=None, what="batches"):
        reported.append((self.progress.tasks[-1].description, done, what))
        original(self, done, total, what)

    monkeypatch.setattr(summary.EvalLine, "report", record)
    engine.evaluate("before")
    batches = sum(1 for _ in engine.val_batches())
    # the student's pass, then the teacher's (measured once): each batch counted as it is read
    assert batches >= 2
    assert reported == [("evaluating (before): perplexity", n, "batches") for n in [*range(1, batches + 1)] * 2]
