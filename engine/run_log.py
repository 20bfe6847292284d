"""What a training run writes about itself: run.json (its provenance), the metrics logger, the loss plot.

    record = run_record(kind, cfg, resolved, layout, tokens_per_step, init_from, heldout_clusters)
    write_run_record(run_dir, record)                  # <run_dir>/run.json, and one summary line printed
    logger = MetricsLogger.open(run_dir, start_step, tensorboard=cfg.train.tensorboard)
    logger.log({"step": 1, "loss": 3.2, ...})          # to every sink, with a wall-clock "time"
    logger.close()
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png", kind)

Sinks: `metrics.jsonl` (one JSON object per optimizer step, validation steps with `val_loss`, each with
`time` in seconds since the epoch) and, with train.tensorboard=true, TensorBoard event files under
<run_dir>/tensorboard (torch.utils.tensorboard; scalars train/<name> and val/loss). On resume both drop what
was logged after the checkpoint, so the logs read like an uninterrupted run. Only rank 0 writes; other ranks
get a logger without sinks.

run.json (read by `flan eval`): kind, parameters (the whole model's), layout (dp, pp, tp, sp, virtual_stages,
schedule, microbatches, zero), tokens_per_step, commit and dirty (the code's git state when it is a checkout),
config_hash (sha256 of the canonical config JSON), kernels (attention and loss as resolved for the device),
init_from (the step folder loaded), heldout_clusters (tuning: the clusters the mixture left out), world_size
and config (as written, before "auto" was resolved).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

from engine.config import KERNEL_FIELDS, Config
from engine.info import parameter_table
from engine.paths import REPO_ROOT


# ---- run.json -----------------------------------------------------------------------------------------------
def code_version(root: Path = REPO_ROOT) -> tuple[str | None, bool]:
    """(commit, dirty) of the code when it runs from a git checkout; (None, False) otherwise."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None, False
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    return commit.stdout.strip(), bool(status.stdout.strip())


def config_hash(cfg: Config) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no spaces): equal configs, equal hashes."""
    text = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def run_record(kind: str, cfg: Config, resolved: Config, layout_summary: dict, world_size: int,
               tokens_per_step: int, init_from: str | None, heldout_clusters: list[str]) -> dict:
    """The provenance of a run: `cfg` as written, `resolved` with every "auto" made for this device."""
    commit, dirty = code_version()
    return {"kind": kind, "parameters": sum(parameter_table(cfg).values()), "layout": layout_summary,
            "world_size": world_size, "tokens_per_step": tokens_per_step, "commit": commit, "dirty": dirty,
            "config_hash": config_hash(cfg),
            "kernels": {name: getattr(resolved.model, name) for name in KERNEL_FIELDS},
            "precision": resolved.train.precision, "init_from": init_from,
            "heldout_clusters": list(heldout_clusters), "config": cfg.to_dict()}


def write_run_record(run_dir: Path, record: dict) -> None:
    """<run_dir>/run.json, and the summary printed once."""
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))
    lay, kernels = record["layout"], record["kernels"]
    commit = "no git checkout" if record["commit"] is None else (
        record["commit"][:12] + (" (uncommitted changes)" if record["dirty"] else ""))
    print(f"{record['kind']}: {record['parameters'] / 1e6:.2f}M parameters; layout dp={lay['dp']} pp={lay['pp']} "
          f"tp={lay['tp']} sp={lay['sp']} schedule={lay['schedule']} microbatches={lay['microbatches']} "
          f"zero={lay['zero']}; {record['tokens_per_step']} tokens/step; {record['precision']}, attention "
          f"{kernels['attention']}, loss {kernels['loss']}; code {commit}; config {record['config_hash'][:12]}; "
          f"{run_dir / 'run.json'}", flush=True)


# ---- the metrics logger -------------------------------------------------------------------------------------
def _record(line: str) -> dict | None:
    """One metrics.jsonl line, or None for a line a kill cut short (dropped on resume, like later lines)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class JsonlSink:
    """metrics.jsonl: one line per record; a resumed run first drops the lines after its checkpoint."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        if start_step == 0 or not path.is_file():
            path.write_text("")
        else:
            kept = [line for line in path.read_text(errors="replace").splitlines()
                    if (record := _record(line)) is not None and record.get("step", 0) <= start_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardSink:
    """TensorBoard event files: every number of a record as a scalar at its step (purged past a resume)."""

    def __init__(self, folder: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (requirements.txt)

        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = "val/loss" if key == "val_loss" else f"train/{key}"
            self.writer.add_scalar(tag, value, record["step"], walltime=record["time"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricsLogger:
    """One logger, several sinks: each record goes to all of them with a wall-clock `time` added."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    @classmethod
    def open(cls, run_dir: Path, start_step: int, *, tensorboard: bool, enabled: bool = True) -> "MetricsLogger":
        """The run's sinks (none when not `enabled`: ranks other than 0)."""
        if not enabled:
            return cls([])
        sinks = [JsonlSink(run_dir / "metrics.jsonl", start_step)]
        if tensorboard:
            sinks.append(TensorBoardSink(run_dir / "tensorboard", start_step))
        return cls(sinks)

    def log(self, record: dict) -> None:
        record = dict(record, time=time.time())
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


# ---- the loss plot ------------------------------------------------------------------------------------------
def plot_losses(metrics_path: Path, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for line in metrics_path.read_text(errors="replace").splitlines() if (r := _record(line)) and "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
