"""train.report_to: the Trainer's own tracker integrations plus lorapipe's figures, into real trackers (TensorBoard
event files, an MLflow server started on loopback with a sqlite store, W&B offline). No network."""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from lorapipe import tracking, train
from lorapipe.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_command() -> list[str]:
    """The full mlflow (server and UI) lives in its own environment (`make venv`: .venv-mlflow), so that its
    scikit-learn stays out of lorapipe's: transformers would import it in every process."""
    own = REPO / ".venv-mlflow" / "bin" / "mlflow"
    if own.is_file():
        return [str(own)]
    found = shutil.which("mlflow")
    if found is None:
        pytest.fail("no MLflow server to test against: `make venv` creates .venv-mlflow")
    return [found]


@pytest.fixture()
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [*_mlflow_command(), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination",
         str(tmp_path / "artifacts")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def test_trackers_receive_the_loss_the_params_and_the_adapter(tiny_cfg, tmp_path, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "lorapipe-test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg(**{"train.report_to": "tensorboard,mlflow,wandb", "train.max_steps": 3})
    r = train.run(cfg)
    ids = json.loads((r.run_dir / "logs" / "tracking.json").read_text())
    assert set(ids) == {"tensorboard", "mlflow", "wandb"}

    # TensorBoard: event files in the run's logs/tensorboard, holding the Trainer's loss at every step
    ev = EventAccumulator(str(r.run_dir / "logs" / "tensorboard"))
    ev.Reload()
    losses = [e.value for e in ev.Scalars("train/loss")]
    logged = [json.loads(x)["loss"] for x in (r.run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert losses == pytest.approx(logged, rel=1e-5) and len(losses) == 3

    # MLflow: the Trainer's metrics, lorapipe's preflight params and summary, the adapter as an artifact
    client = MlflowClient(mlflow_server)
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.run_name == cfg.name and len(client.get_metric_history(run.info.run_id, "loss")) == 3
    assert run.data.params["preflight.examples"] == str(json.loads((r.run_dir / "preflight.json").read_text())[
        "examples"])
    assert run.data.metrics["lorapipe/train_loss"] == pytest.approx(r.train_loss)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= names

    # W&B offline: its run folder, with the run's id
    assert list(tmp_path.glob(f"wandb/offline-run-*-{ids['wandb']['id']}"))

    # a later stage's figures go to the same tracker runs
    done = tracking.log_metrics(r.run_dir, {"eval/heldout/pass@1": 0.25}, step=3)
    assert done == ["mlflow", "wandb", "tensorboard"]
    assert client.get_run(run.info.run_id).data.metrics["eval/heldout/pass_at_1"] == 0.25  # MLflow's charset
    ev = EventAccumulator(str(r.run_dir / "logs" / "tensorboard"))
    ev.Reload()
    assert [e.value for e in ev.Scalars("eval/heldout/pass_at_1")] == [0.25]


def test_a_missing_or_unreachable_tracker_stops_before_loading(tiny_cfg, monkeypatch):
    from transformers.integrations import integration_utils as iu

    monkeypatch.setattr(iu, "is_trackio_available", lambda: False)
    with pytest.raises(UserError, match=r"trackio is not installed; pip install 'lorapipe\[trackio\]'"):
        train.run(tiny_cfg(**{"train.report_to": "trackio"}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(UserError, match="MLflow server at MLFLOW_TRACKING_URI=.* does not answer"):
        tracking.check(["mlflow"])
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")
    with pytest.raises(UserError, match="wandb needs a login"):
        tracking.check(["wandb"])
