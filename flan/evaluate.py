"""Zero-shot (or few-shot) evaluation of one model over datasets and templates: the data-side adapter.

    registry = include_tasks(load_registry(), Path("my_tasks"))   # --include: my_tasks/tasks, my_tasks/templates
    specs = select_datasets(registry, data_dir, datasets="rte,cb", clusters=None, default_clusters=["nli"])
    rows = evaluate_model(layout, tokenizer, specs, cfg, data_dir=..., templates="all", label="tuned", input_len=1024)

Dev split rule (the shared data has train and validation only): a dataset's validation rows are shuffled
with a fixed seed and cut to `limit`; the first half is the dev split, used only to pick the best template,
and the second half is the test split on which every reported number is measured (--split test). --split dev
reports the dev half, --split all every row (the default when templates are named by index: nothing to pick). FLAN evaluates the
templates that ask the task itself: "turned around" templates (write a hypothesis for a given answer)
are left out. Few-shot prompts (FLAN's format) prepend k train exemplars rendered with the same template,
each "prompt\\ntarget", joined and followed by the test prompt with EXEMPLAR_SEPARATOR. A QA row that lists
all its accepted answers (`answers`) is scored against each of them when the template targets `{answer}`.

The result is a list of score rows: {model, dataset, cluster, template, split, metric, value, n, stderr,
primary, truncated, unscored, examples, per_example} (primary marks the dataset's headline metric,
flan.metrics.primary_metric; truncated counts prompts cut to input_len; unscored the dataset's validation
rows left out by `scorable_rows`; examples and per_example, the
example ids and each one's value, feed the clustered intervals of flan/report.py and are not written to
scores.json; corpus BLEU rows carry texts and references instead of per_example).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from engine.config import Config
from engine.errors import UsageError
from flan.loaders import has_split, load_split
from flan.metrics import generation_metrics, generation_per_example, primary_metric, rank_metrics, rank_per_example
from flan.registry import CLUSTERS_FILE, Registry, TaskSpec, parse_clusters, parse_task
from flan.samples import sample_records
from flan.layout_scorer import score_with_layout
from flan.scorer import EvalRequest
from flan.templates import label_index, load_templates, options_of, render_template

EXEMPLAR_SEPARATOR = "\n\n"
ANSWERS_FIELD = "answers"  # QA rows (natural_questions, trivia_qa) list every accepted answer here
SPLIT_SEED = 20220208  # FLAN's ICLR 2022 publication date: any fixed number works
SPLITS = ("test", "dev", "all")


class EvalError(UsageError, ValueError):
    """An evaluation request that cannot be served; the message names the argument and the fix."""


def include_tasks(registry: Registry, folder: Path) -> Registry:
    """The registry plus the task files of <folder>/tasks (and clusters of its _clusters.toml), whose templates
    live in <folder>/templates. An included task's `data` may be a folder under <folder> (a relative path
    that exists there, kept inside it) instead of a name under the data directory."""
    folder = Path(folder).resolve()
    tasks_dir = folder / "tasks"
    if not tasks_dir.is_dir():
        raise EvalError(f"--include {folder}: no tasks/ folder; put task files in {tasks_dir} and their templates "
                        f"in {folder / 'templates'}")
    clusters = dict(registry.clusters)
    if (tasks_dir / CLUSTERS_FILE).is_file():
        clusters.update(parse_clusters(tasks_dir / CLUSTERS_FILE))
    tasks = dict(registry.tasks)
    for path in sorted(tasks_dir.glob("*.toml")):
        if path.name.startswith("_"):
            continue
        spec = parse_task(path, require_source=False)
        if spec.name in tasks:
            raise EvalError(f"--include {path}: dataset {spec.name!r} is already defined by {tasks[spec.name].source}; "
                            "rename it")
        if spec.cluster not in clusters:
            raise EvalError(f"--include {path}: cluster {spec.cluster!r} is unknown; known: {', '.join(clusters)} "
                            f"(or define it in {tasks_dir / CLUSTERS_FILE})")
        local = (folder / spec.data).resolve() if spec.data else None
        if local is not None and local.is_dir():
            if not local.is_relative_to(folder):
                raise EvalError(f"--include {path}: data = {spec.data!r} leaves {folder}; keep data inside it")
            spec = dataclasses.replace(spec, data=str(local))
        tasks[spec.name] = spec
    return Registry(tasks, clusters, registry.folder)


def _names(arg: str | None) -> list[str]:
    return [x.strip() for x in arg.split(",") if x.strip()] if arg else []


def select_datasets(registry: Registry, data_dir: Path, *, datasets: str | None, clusters: str | None,
                    default_clusters: list[str]) -> tuple[list[TaskSpec], list[str]]:
    """The datasets asked for (names, clusters, or else `default_clusters`: those the checkpoint was tuned
    without) that have validation data here, and the names of those asked for that have none."""
    if datasets and clusters:
        raise EvalError("--datasets and --clusters both given; pick datasets by name or by cluster, not both")
    if datasets:
        asked = [registry.get(n) for n in _names(datasets)]
    else:
        asked = [t for c in (_names(clusters) or default_clusters) for t in registry.in_cluster(c)]
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


def split_rows(n_rows: int, limit: int, split: str) -> tuple[list[int], list[int]]:
    """(rows for the dev pick, rows reported) for --split test (dev half, test half), dev (none, dev half) or
    all (none, every row up to the limit, seeded order)."""
    if split not in SPLITS:
        raise EvalError(f"--split {split!r}: use one of {', '.join(SPLITS)}")
    dev, test = dev_test_rows(n_rows, limit)
    return {"test": (dev, test), "dev": ([], dev), "all": ([], dev + test)}[split]


def default_split(templates: str) -> str:
    """Templates named by index need no dev pick, so every row is reported; all and best keep the dev half."""
    return "test" if templates in ("all", "best") else "all"


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


def scorable_rows(spec: TaskSpec, rows: list[dict]) -> tuple[list[dict], int]:
    """The validation rows rank classification can score, and how many were left out: a multiple-choice
    row with an empty option has nothing to score for it (the shared ARC sample pads 3-choice questions with
    "" and lost every option's text in some rows). Training keeps such rows as the loaders accept them."""
    if spec.kind != "mc":
        return rows, 0
    keep = [r for r in rows if all(o.strip() for o in options_of(spec, r))]
    return keep, len(rows) - len(keep)


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
                               _also_accepted(spec, template, rows[i]), ex.delimiter))
    return out


def request_metrics(spec: TaskSpec, requests: list[EvalRequest], results: list) -> tuple[dict, dict]:
    """The metrics of one template's requests, and each mean metric's per-example values (request order)."""
    if requests[0].options is not None:
        golds = [r.gold for r in requests]
        return rank_metrics(results, golds), rank_per_example(results, golds)
    preds, refs = [r.text for r in results], [r.references for r in requests]
    return generation_metrics(spec.metric, preds, refs), generation_per_example(spec.metric, preds, refs)


def evaluate_model(layout, tokenizer, specs: list[TaskSpec], cfg: Config, *, data_dir: Path, templates: str,
                   label: str, input_len: int, split: str = "test", progress_factory=None,
                   samples: list | None = None) -> list[dict]:
    """Score rows for every dataset and template: dev rows (for the pick) and test rows (for the report), on
    any layout (flan/layout_scorer.py), prompts cut to their last `input_len` tokens; `split` names the rows
    reported (split_rows). Per-example records
    (flan/samples.py) are appended to `samples` when it is a list."""
    ev = cfg.eval
    jobs = []  # (spec, validation rows, train rows, dev ids, test ids, templates)
    unscored: dict[str, int] = {}  # dataset -> validation rows scorable_rows left out
    for spec in specs:
        if ev.few_shot and not has_split(spec, "train", data_dir):
            raise EvalError(f"--eval.few_shot={ev.few_shot}: dataset {spec.name} has no train split for exemplars")
        rows, unscored[spec.name] = scorable_rows(spec, load_split(spec, "validation", data_dir=data_dir,
                                                                   bad_rows=cfg.data.bad_rows).rows)
        if unscored[spec.name]:
            print(f"flan eval: {spec.name}: {unscored[spec.name]} validation rows have an option without text and are not "
                  "scored (rank classification needs at least one token per option)", file=sys.stderr)
        train = load_split(spec, "train", data_dir=data_dir, bad_rows=cfg.data.bad_rows).rows if ev.few_shot else None
        dev, test = split_rows(len(rows), ev.limit, split)
        jobs.append((spec, rows, train, dev, test, eval_templates(spec, templates)))
    total = sum(len(dev) * len(ts) + len(test) * (1 if templates == "best" else len(ts))
                for _, _, _, dev, test, ts in jobs)
    bar = progress_factory(total, label) if progress_factory else None
    out: list[dict] = []

    def run(spec, rows, train, ids, t, split) -> float:
        requests = build_requests(spec, rows, ids, t, few_shot=ev.few_shot, train_rows=train,
                                  instruction_format=cfg.data.instruction_format)
        results = score_with_layout(layout, tokenizer, requests, batch_size=ev.batch_size, input_len=input_len,
                                    max_new_tokens=ev.max_new_tokens,
                                    stops=(EXEMPLAR_SEPARATOR,) if ev.few_shot else (), progress=bar)
        metrics, per_example = request_metrics(spec, requests, results)
        primary = primary_metric(spec.metric, requests[0].options is not None)
        examples = [r.example for r in requests]
        for name, s in metrics.items():
            row = {"model": label, "dataset": spec.name, "cluster": spec.cluster, "template": t, "split": split,
                   "metric": name, "value": s.value, "n": s.n, "stderr": s.stderr, "primary": name == primary,
                   "truncated": sum(r.truncated for r in results), "unscored": unscored[spec.name], "examples": examples}
            if name in per_example:
                row["per_example"] = per_example[name]
            else:  # corpus BLEU: the report resamples the texts themselves
                row["texts"], row["references"] = [r.text for r in results], [r.references[0] for r in requests]
            out.append(row)
        if samples is not None:
            samples.extend(sample_records(label, spec, split, requests, results, per_example))
        return metrics[primary].value

    if templates == "best" and split != "test":
        raise EvalError(f"--templates best needs the dev half to pick on; use --split test (not {split})")
    for spec, rows, train, dev, test, chosen in jobs:
        dev_scores = {t: run(spec, rows, train, dev, t, "dev") for t in chosen} if dev else {}
        if templates == "best":
            if not dev_scores:
                raise EvalError(f"--templates best: dataset {spec.name} has too few rows for a dev split; "
                                "raise --limit or pick templates by index")
            chosen = [max(dev_scores, key=lambda t: (dev_scores[t], -t))]
        for t in chosen:
            if test:
                run(spec, rows, train, test, t, split)
    if bar is not None:
        bar.close()
    return out
