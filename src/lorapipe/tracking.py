"""Experiment tracking: the Trainer's own integrations (train.report_to), plus lorapipe's figures in the same place.

The per-step loss, learning rate and so on go through transformers' callbacks for TensorBoard, MLflow, Weights &
Biases and Trackio. What only lorapipe knows goes to the same run: the preflight summary as parameters when training
starts, the adapter as an MLflow artifact when it is saved, and later stages' results (eval pass@1, verify
agreement) as metrics. Which tracker run belongs to a lorapipe run is written to logs/tracking.json, so that
`lorapipe eval` or `verify`, days later and in another process, adds to the same tracker run.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lorapipe.errors import UserError
from lorapipe.runs import write_json

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
MANIFEST = Path("logs") / "tracking.json"


def check(report_to: list[str]) -> None:
    """Refuse before any model loads (exit 2): a tracker that is not installed, an MLflow server that does not
    answer, W&B online without a login."""
    from transformers.integrations import integration_utils as iu

    installed = {"tensorboard": iu.is_tensorboard_available, "mlflow": iu.is_mlflow_available,
                 "wandb": iu.is_wandb_available, "trackio": iu.is_trackio_available}
    for name in report_to:
        if not installed[name]():
            raise UserError(f"train.report_to: {name} is not installed; pip install 'lorapipe[{name}]' (or remove "
                            f"{name} from train.report_to)")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if "mlflow" in report_to and uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).read()  # noqa: S310
        except OSError as exc:
            raise UserError(f"train.report_to: the MLflow server at MLFLOW_TRACKING_URI={uri} does not answer "
                            f"({getattr(exc, 'reason', exc)}); start it, or unset MLFLOW_TRACKING_URI to log to "
                            "./mlruns") from None
    if "wandb" in report_to and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled"):
        if not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").is_file()):
            raise UserError("train.report_to: wandb needs a login (`wandb login`, or WANDB_API_KEY); or log offline "
                            "with WANDB_MODE=offline and `wandb sync` later")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v
    return out


def preflight_params(report: dict[str, Any]) -> dict[str, Any]:
    """The preflight summary as flat parameters (no per-example lists)."""
    keep = {k: v for k, v in report.items() if k not in ("examples_rendered", "lengths", "samples")}
    return {f"preflight.{k}": v for k, v in _flat(keep).items()}


class Tracking(TrainerCallback):
    """Rank 0, after the Trainer's own integration callbacks have started their runs: the preflight summary as
    parameters, and each tracker run's identity for logs/tracking.json."""

    def __init__(self, report_to: list[str], params: dict[str, Any]):
        self.report_to, self.params = report_to, params
        self.ids: dict[str, Any] = {}

    def on_train_begin(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        if "mlflow" in self.report_to:
            import mlflow

            run = mlflow.active_run()
            if run is not None:
                mlflow.log_params({k[:250]: str(v)[:500] for k, v in self.params.items()})
                self.ids["mlflow"] = {"tracking_uri": mlflow.get_tracking_uri(), "run_id": run.info.run_id}
        if "wandb" in self.report_to:
            import wandb

            if wandb.run is not None:
                wandb.config.update(self.params, allow_val_change=True)
                self.ids["wandb"] = {"id": wandb.run.id, "project": wandb.run.project, "dir": str(wandb.run.dir),
                                     "mode": os.environ.get("WANDB_MODE", "online")}
        if "tensorboard" in self.report_to:
            self.ids["tensorboard"] = {"logdir": str(MANIFEST.parent / "tensorboard")}
        if "trackio" in self.report_to:
            self.ids["trackio"] = {"project": os.environ.get("TRACKIO_PROJECT_NAME", "huggingface")}


def callbacks(report_to: list[str], params: dict[str, Any], run_tmp: Path) -> tuple[list[Any], Tracking | None]:
    """The callbacks lorapipe adds: TensorBoard writing into the run's logs/tensorboard/ (the Trainer's default is
    a timestamped folder under output_dir), and Tracking."""
    if not report_to:
        return [], None
    out: list[Any] = []
    if "tensorboard" in report_to:
        from transformers.integrations import TensorBoardCallback

        tb = TensorBoardCallback()
        tb.logging_dir = str(run_tmp / MANIFEST.parent / "tensorboard")
        out.append(tb)
    t = Tracking(report_to, params)
    return [*out, t], t


def trainer_report_to(report_to: list[str]) -> list[str] | str:
    """What the Trainer integrates itself (TensorBoard is added by `callbacks`, into the run's folder)."""
    return [r for r in report_to if r != "tensorboard"] or "none"


def after_training(run_tmp: Path, tracking: Tracking | None, metrics: dict[str, Any]) -> None:
    """Record which tracker runs belong to this run, and send the adapter (MLflow artifact) and the run's summary
    figures."""
    if tracking is None:
        return
    write_json(run_tmp / MANIFEST, tracking.ids)
    summary = {k: metrics[k] for k in ("train_loss", "tokens_per_s", "runtime_s", "peak_gpu_mem_gib")
               if isinstance(metrics.get(k), (int, float))}
    log_metrics(run_tmp, {f"lorapipe/{k}": v for k, v in summary.items()}, step=metrics.get("steps", 0))
    m = tracking.ids.get("mlflow")
    if m:
        from mlflow.tracking import MlflowClient

        MlflowClient(m["tracking_uri"]).log_artifacts(m["run_id"], str(run_tmp / "adapter"), "adapter")


def log_metrics(run_dir: str | Path, figures: dict[str, float], step: int = 0) -> list[str]:
    """Add `figures` to every tracker run of logs/tracking.json (eval, verify: days later, another process); the
    trackers written to. Nothing when the run was not tracked."""
    run_dir = Path(run_dir)
    try:
        ids = json.loads((run_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return []
    # one name in every tracker, in what MLflow allows (alphanumerics, _ - . space : /): pass@1 -> pass_at_1
    figures = {re.sub(r"[^\w\-. :/]", "_", k.replace("@", "_at_")): v for k, v in figures.items()}
    done = []
    if "mlflow" in ids:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(ids["mlflow"]["tracking_uri"])
        for k, v in figures.items():
            client.log_metric(ids["mlflow"]["run_id"], k, float(v), step=step)
        done.append("mlflow")
    if "wandb" in ids:
        import wandb

        w = ids["wandb"]
        live = wandb.run is not None and wandb.run.id == w["id"]  # the Trainer's run, still open in this process
        run = wandb.run if live else wandb.init(id=w["id"], project=w["project"], dir=str(Path(w["dir"]).parents[2]),
                                                resume="allow", mode=w.get("mode", "online"))
        run.summary.update(figures)
        if not live:
            run.finish()
        done.append("wandb")
    if "tensorboard" in ids:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(run_dir / ids["tensorboard"]["logdir"])) as w:
            for k, v in figures.items():
                w.add_scalar(k, float(v), global_step=step)
        done.append("tensorboard")
    return done
