"""Zero-shot (or few-shot) evaluation of one model over datasets and templates: the data-side adapter.

    specs = select_datasets(registry, data_dir, datasets="rte,cb", clusters=None, default_cluster="nli")
    rows = evaluate_model(model, tokenizer, specs, cfg, data_dir=..., templates="all", label="tuned")

Dev split rule (the shared data has train and validation only): a dataset's validation rows are shuffled
with a fixed seed and cut to `limit`; the first half is the dev split, used only to pick the best template,
and the second half is the test split on which every reported number is measured. FLAN evaluates the
templates that ask the task itself: "turned around" templates (write a hypothesis for a given answer)
are left out. Few-shot prompts (FLAN's format) prepend k train exemplars rendered with the same template,
each "prompt\\ntarget", joined and followed by the test prompt with EXEMPLAR_SEPARATOR. A QA row that lists
all its accepted answers (`answers`) is scored against each of them when the template targets `{answer}`.

The result is a list of score rows: {model, dataset, cluster, template, split, metric, value, n, stderr,
primary} (primary marks the dataset's headline metric, flan.metrics.primary_metric).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.config import Config
from flan.loaders import has_split, load_split
from flan.metrics import generation_metrics, primary_metric, rank_metrics
from flan.registry import Registry, TaskSpec
from flan.scorer import EvalRequest, score_requests
from flan.templates import label_index, load_templates, render_template

EXEMPLAR_SEPARATOR = "\n\n"
ANSWERS_FIELD = "answers"  # QA rows (natural_questions, trivia_qa) list every accepted answer here
SPLIT_SEED = 20220208  # FLAN's ICLR 2022 publication date: any fixed number works


class EvalError(ValueError):
    """An evaluation request that cannot be served; the message names the argument and the fix."""


def _names(arg: str | None) -> list[str]:
    return [x.strip() for x in arg.split(",") if x.strip()] if arg else []


def select_datasets(registry: Registry, data_dir: Path, *, datasets: str | None, clusters: str | None,
                    default_cluster: str) -> tuple[list[TaskSpec], list[str]]:
    """The datasets asked for (names, clusters, or the held-out cluster) that have validation data here,
    and the names of those asked for that have none."""
    if datasets and clusters:
        raise EvalError("--datasets and --clusters both given; pick datasets by name or by cluster, not both")
    if datasets:
        asked = [registry.get(n) for n in _names(datasets)]
    else:
        asked = [t for c in (_names(clusters) or [default_cluster]) for t in registry.in_cluster(c)]
    present = [t for t in asked if has_split(t, "validation", data_dir)]
    missing = [t.name for t in asked if t not in present]
    if not present:
        raise EvalError(f"none of the datasets asked for ({', '.join(t.name for t in asked)}) has a validation "
                        f"split under {data_dir}; pick others with --datasets or --clusters")
    return present, missing


def eval_templates(spec: TaskSpec, choice: str) -> list[int]:
    """Template indices to score: every template that asks the task itself, or the listed ones."""
    templates = load_templates(spec)
    usable = [t.index for t in templates if not t.turned_around]
    if choice in ("all", "best"):
        return usable
    try:
        wanted = [int(x) for x in _names(choice)]
    except ValueError:
        raise EvalError(f"--templates {choice!r}: write all, best, or a comma list of indices like 0,3") from None
    bad = [i for i in wanted if i not in usable]
    if bad:
        raise EvalError(f"--templates {choice!r}: dataset {spec.name} has no usable template {bad[0]}; "
                        f"usable (not turned around): {usable}")
    return wanted


def dev_test_rows(n_rows: int, limit: int) -> tuple[list[int], list[int]]:
    """The seeded dev and test halves of a validation split (see the module docstring)."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n_rows).tolist()
    if limit:
        order = order[:limit]
    half = len(order) // 2
    return order[:half], order[half:]


def _few_shot_prefix(spec: TaskSpec, template, train_rows: list[dict], k: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(train_rows), size=min(k, len(train_rows)), replace=False)
    shots = [render_template(spec, template, train_rows[int(i)]) for i in picks]
    return "".join(f"{s.prompt}\n{s.target}{EXEMPLAR_SEPARATOR}" for s in shots)


def _also_accepted(spec: TaskSpec, template, row: dict) -> tuple[str, ...]:
    """Every accepted answer of a QA row whose template targets its `answer` and that lists `answers`."""
    if template.target != "{answer}" or spec.fields.get(ANSWERS_FIELD) is None:
        return ()
    return tuple(str(a) for a in row.get(ANSWERS_FIELD) or ())


def build_requests(spec: TaskSpec, rows: list[dict], row_ids: list[int], template_index: int, *,
                   few_shot: int = 0, train_rows: list[dict] | None = None,
                   instruction_format: str = "flan") -> list[EvalRequest]:
    """Rendered requests of one template over the given rows (exemplars differ per row, seeded by it)."""
    template = load_templates(spec)[template_index]
    out = []
    for i in row_ids:
        ex = render_template(spec, template, rows[i], instruction_format)
        prefix = _few_shot_prefix(spec, template, train_rows, few_shot, seed=i) if few_shot else ""
        gold = label_index(spec, rows[i]) if ex.options is not None else None
        out.append(EvalRequest(spec.name, template_index, i, prefix + ex.prompt, ex.target, ex.options, gold,
                               _also_accepted(spec, template, rows[i])))
    return out


def request_metrics(spec: TaskSpec, requests: list[EvalRequest], results: list) -> dict:
    if requests[0].options is not None:
        return rank_metrics(results, [r.gold for r in requests])
    return generation_metrics(spec.metric, [r.text for r in results], [r.references for r in requests])


def evaluate_model(model, tokenizer, specs: list[TaskSpec], cfg: Config, *, data_dir: Path, templates: str,
                   label: str, progress_factory=None) -> list[dict]:
    """Score rows for every dataset and template: dev rows (for the pick) and test rows (for the report)."""
    ev = cfg.eval
    jobs = []  # (spec, validation rows, train rows, dev ids, test ids, templates)
    for spec in specs:
        if ev.few_shot and not has_split(spec, "train", data_dir):
            raise EvalError(f"--eval.few_shot={ev.few_shot}: dataset {spec.name} has no train split for exemplars")
        rows = load_split(spec, "validation", data_dir=data_dir, bad_rows=cfg.data.bad_rows).rows
        train = load_split(spec, "train", data_dir=data_dir, bad_rows=cfg.data.bad_rows).rows if ev.few_shot else None
        dev, test = dev_test_rows(len(rows), ev.limit)
        jobs.append((spec, rows, train, dev, test, eval_templates(spec, templates)))
    total = sum(len(dev) * len(ts) + len(test) * (1 if templates == "best" else len(ts))
                for _, _, _, dev, test, ts in jobs)
    bar = progress_factory(total, label) if progress_factory else None
    out: list[dict] = []

    def run(spec, rows, train, ids, t, split) -> float:
        requests = build_requests(spec, rows, ids, t, few_shot=ev.few_shot, train_rows=train,
                                  instruction_format=cfg.data.instruction_format)
        results = score_requests(model, tokenizer, requests, batch_size=ev.batch_size, input_len=cfg.data.input_len,
                                 max_new_tokens=ev.max_new_tokens,
                                 stops=(EXEMPLAR_SEPARATOR,) if ev.few_shot else (), progress=bar)
        metrics = request_metrics(spec, requests, results)
        primary = primary_metric(spec.metric, requests[0].options is not None)
        for name, s in metrics.items():
            out.append({"model": label, "dataset": spec.name, "cluster": spec.cluster, "template": t,
                        "split": split, "metric": name, "value": s.value, "n": s.n, "stderr": s.stderr,
                        "primary": name == primary})
        return metrics[primary].value

    for spec, rows, train, dev, test, chosen in jobs:
        dev_scores = {t: run(spec, rows, train, dev, t, "dev") for t in chosen} if dev else {}
        if templates == "best":
            if not dev_scores:
                raise EvalError(f"--templates best: dataset {spec.name} has too few rows for a dev split; "
                                "raise --limit or pick templates by index")
            chosen = [max(dev_scores, key=lambda t: (dev_scores[t], -t))]
        for t in chosen:
            if test:
                run(spec, rows, train, test, t, "test")
    if bar is not None:
        bar.close()
    return out
