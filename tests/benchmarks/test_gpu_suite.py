"""benchmarks/gpu_suite.sh: its dry run lists every GPU step, and its CPU smoke runs end to end."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"


def run_suite(out: Path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run(["bash", str(SUITE), str(out), mode], capture_output=True, text=True, env=env, timeout=600,
                          cwd=REPO)


def test_dry_run_lists_the_gpu_steps_and_runs_nothing(tmp_path):
    done = run_suite(tmp_path / "out", "--dry-run")
    assert done.returncode == 0, done.stderr
    steps = [line.split(":", 1)[0] for line in done.stdout.splitlines()]
    assert steps == ["attention-check", "ce-check", "attention", "attention-gqa", "attention-tma", "ce-bf16", "ce-fp32",
                     "train-125m", "train-1.3b", "report"]
    assert "--check bf16" in done.stdout and "--dtype fp32" in done.stdout and "gpu-1.3b" in done.stdout
    commands = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    for step in ("attention-check", "attention-tma"):  # the TMA path checked, and timed against the pointer one
        assert " --tma " in commands[step], step
    assert "--providers triton triton-tma " in commands["attention-tma"]
    assert not (tmp_path / "out").exists()


def test_cpu_smoke_runs_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    done = run_suite(out, "--smoke")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == ["attention-check", "ce", "train"] and all(s["rc"] == 0 for s in steps)
    check = json.loads((out / "attention-check" / "check_fp16.json").read_text())["rows"]
    assert {r["provider"] for r in check} == {"triton", "triton-fused-bwd", "triton-tma"}
    assert all(r["ok"] for r in check)
    train = json.loads((out / "train" / "train.json").read_text())["rows"]
    assert {r["layout"] for r in train} == {"unpacked", "packed"} and all(r["tokens_per_s"] > 0 for r in train)
    variants = {(r["choice"], r["attention_tiles"], r["attention_backward"]) for r in train}
    assert variants == {("triton/triton", "pointers", "split"), ("triton+tma+fused-bwd/triton", "tma", "fused")}
    summary = (out / "summary.md").read_text()
    for needle in ("- device: cpu", "- commit: ", "- command: bash benchmarks/gpu_suite.sh", "## train/train.json"):
        assert needle in summary, needle


def test_train_choices_name_the_kernel_flags():
    from benchmarks.sm90_train import choice_flags

    assert choice_flags("triton+tma+fused-bwd/fused") == ["--model.attention=triton", "--model.attention_tiles=tma",
                                                         "--model.attention_backward=fused", "--model.loss=fused"]
    assert choice_flags("torch/torch") == ["--model.attention=torch", "--model.loss=torch"]
    for bad in ("triton", "triton+wgmma/fused"):
        try:
            choice_flags(bad)
        except SystemExit as e:
            assert "--choices" in str(e) and bad in str(e)
        else:
            raise AssertionError(f"{bad} was accepted")
