"""lm-evaluation-harness as a peer of our scorer: the same rendered requests, scored by its HFLM.

    scores = lm_eval_scores(hf_dir, requests, work_dir)        # simple_evaluate on a task built from them
    scores.logprobs[i][j], scores.acc, scores.acc_norm
    lls = lm_eval_loglikelihoods(lm, requests)                 # its loglikelihood path only (benchmarks)

The task is defined locally, nothing is downloaded: our prompts, options and gold indices go to a JSONL file
and a `multiple_choice` task config reads it (`doc_to_text` = the prompt, `doc_to_choice` = the options,
target delimiter " "). lm-eval scores a choice as tokens(prompt + " " + option) minus tokens(prompt); with
the exported tokenizer (SentencePiece-exact, engine/hf.py), which puts "▁" before every word, that equals
our tokens(prompt) + tokens(option) whenever the prompt ends in a non-space, which `same_tokens` checks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from flan.scorer import EvalRequest

TARGET_DELIMITER = " "


@dataclass
class PeerScores:
    logprobs: list[list[float]]   # per request, per option
    acc: float                    # fractions, as lm-eval reports them
    acc_norm: float


def lm_eval_task(name: str, data_file: Path) -> dict:
    """An lm-eval task config over a local JSONL of {prompt, options, gold} rows."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "options",
        "doc_to_target": "gold",
        "target_delimiter": TARGET_DELIMITER,
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }


def write_requests(requests: Sequence[EvalRequest], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps({"prompt": r.prompt, "options": list(r.options), "gold": r.gold}) + "\n")
    return path


def hflm(hf_dir: Path, batch_size: int):
    """lm-eval's HuggingFace model on an exported folder, fp32 on the CPU, no BOS (as we score)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=batch_size,
                add_bos_token=False)


def lm_eval_scores(lm, requests: Sequence[EvalRequest], work_dir: Path, name: str = "flan_peer") -> PeerScores:
    """Run lm-eval's simple_evaluate on a task made of `requests`; per-example option log-likelihoods."""
    from lm_eval import simple_evaluate

    data = write_requests(requests, Path(work_dir) / f"{name}.jsonl")
    out = simple_evaluate(model=lm, tasks=[lm_eval_task(name, data)], log_samples=True, verbosity="ERROR")
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    logprobs = [[float(resp[0][0]) for resp in s["resps"]] for s in samples]
    metrics = out["results"][name]
    return PeerScores(logprobs, float(metrics["acc,none"]), float(metrics["acc_norm,none"]))


def lm_eval_loglikelihoods(lm, requests: Sequence[EvalRequest]) -> list[list[float]]:
    """lm-eval's loglikelihood path alone: one (context, continuation) instance per option."""
    from lm_eval.api.instance import Instance

    instances = [Instance("loglikelihood", {}, (r.prompt, TARGET_DELIMITER + o), k)
                 for k, (r, o) in enumerate((r, o) for r in requests for o in r.options)]
    flat = [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]
    out, k = [], 0
    for r in requests:
        out.append(flat[k:k + len(r.options)])
        k += len(r.options)
    return out


def same_tokens(hf_tokenizer, tokenizer, requests: Sequence[EvalRequest]) -> list[int]:
    """Indices of requests where lm-eval's continuation tokens would differ from ours (empty when none)."""
    bad = []
    for i, r in enumerate(requests):
        ctx = hf_tokenizer.encode(r.prompt, add_special_tokens=False)
        for o in r.options:
            whole = hf_tokenizer.encode(r.prompt + TARGET_DELIMITER + o, add_special_tokens=False)
            if whole[:len(ctx)] != tokenizer.encode(r.prompt) or whole[len(ctx):] != tokenizer.encode(o):
                bad.append(i)
                break
    return bad
