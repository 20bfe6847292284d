"""Per-example evaluation logs, lm-eval's --log_samples: <out>/samples/<dataset>.jsonl, one object per request.

    records = sample_records("tuned", spec, "test", requests, results, per_example)
    write_samples(records, out / "samples")            # one file per dataset, every model's records in it

A ranked record holds the rendered prompt, options, gold index, each option's summed log-probability with its
token and UTF-8 byte counts, the option each normalisation predicts and whether it is right; a generated one
holds the text, the references and each per-example metric against them. Both name the model, dataset,
cluster, template, example id (its row in the validation file) and split (dev or test).
"""
from __future__ import annotations

import json
from pathlib import Path

from flan.metrics import rank_predictions
from flan.registry import TaskSpec
from flan.scorer import EvalRequest, RankResult


def sample_records(model: str, spec: TaskSpec, split: str, requests: list[EvalRequest], results: list,
                   per_example: dict[str, list[float]]) -> list[dict]:
    """One JSON-ready object per request (results and per_example in request order)."""
    out = []
    for k, (req, res) in enumerate(zip(requests, results)):
        rec = {"model": model, "dataset": spec.name, "cluster": spec.cluster, "template": req.template,
               "example": req.example, "split": split, "prompt": req.prompt, "prompt_tokens": res.prompt_tokens,
               "truncated": res.truncated}
        if isinstance(res, RankResult):
            rec.update(options=list(req.options), gold=req.gold, target=req.target, logprobs=list(res.logprobs),
                       option_tokens=list(res.n_tokens), option_bytes=list(res.n_bytes),
                       predictions=rank_predictions(res))
        else:
            rec.update(text=res.text, references=list(req.references))
        rec["metrics"] = {name: values[k] for name, values in per_example.items()}
        out.append(rec)
    return out


def write_samples(records: list[dict], folder: Path) -> list[Path]:
    """<folder>/<dataset>.jsonl per dataset (replaced, not appended: one eval run per folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["dataset"], []).append(r)
    paths = []
    for dataset, recs in by.items():
        path = folder / f"{dataset}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        paths.append(path)
    return paths
