"""The FLAN paper's experiments as data: configs/experiments/<name>.toml expanded into `flan` command lines.

    exp = load_experiment("few_shot")                      # the TOML definition
    steps = expand(exp, Context("configs/tiny.toml", "smoke", Path("runs/experiments/smoke")))
    steps[0].argv                                          # ("pretrain", "configs/tiny.toml", "--train...", ...)

A definition names its expansion (`expand`: one of EXPANSIONS) and that expansion's parameters. Every experiment
expands to steps of four kinds, each one `flan` command (the same a user would type):
    pretrain     the base model (one per model size)                  OUT/runs/base[-size]
    tune         instruction tuning from the base with its data knobs  OUT/runs/tune-<knobs>
    prompt_tune  a soft prompt on a frozen checkpoint                  OUT/runs/prompt-<source>-<dataset>-k<n>
    eval         zero-shot (or few-shot) scores of a checkpoint        OUT/<experiment>/evals/<step>
Training steps are named by their knobs, so experiments run into the same OUT share them (the base model, the
NLI-held-out tuning run). A step is finished when its folder holds step.json with the same command line; a
training folder with checkpoints but no step.json continues (--train.resume=true); a step.json with another
command line stops the run (pick another --out) rather than mixing results.

Which datasets train is the mixture's rule (flan/mixture.py): the registry's tasks outside the held-out
cluster and FLAN's exclusions with it (flan/tasks/_clusters.toml), narrowed to data.train_clusters when given.
`training_datasets` computes it from the registry so the tests check every expansion against its definition.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import ConfigError
from engine.paths import REPO_ROOT
from flan.registry import Registry, load_registry

EXPERIMENTS_DIR = REPO_ROOT / "configs" / "experiments"

# --scale smoke: the same command lines on a 1-layer model for two steps and four examples (CI time); the
# other scales run the config as written.
SMOKE_MODEL = ("--model.d_model=32", "--model.n_layers=1", "--model.n_heads=2", "--model.n_kv_heads=1",
               "--model.head_dim=16", "--model.d_ff=64", "--model.attention=torch", "--model.loss=torch")
SMOKE_TRAIN = ("--train.steps=2", "--train.batch_size=4", "--train.val_every=0", "--train.ckpt_every=0",
               "--optim.warmup_steps=0", "--data.seq_len=32", "--data.input_len=48", "--data.target_len=16")
SMOKE_EVAL = ("--limit", "4", "--templates", "0", "--eval.max_new_tokens=2", "--eval.batch_size=8",
              "--data.input_len=48")
# --scale tiny tunes as the main job does (scripts/run_tiny.sh): 150 steps at a constant rate after a warm-up.
TINY_TUNE = ("--train.steps=150", "--optim.schedule=constant", "--optim.lr=1e-3", "--optim.warmup_steps=10")


@dataclass(frozen=True)
class Step:
    """One `flan` command of an experiment."""

    name: str
    kind: str                          # pretrain | tune | prompt_tune | eval
    argv: tuple[str, ...]
    folder: Path                       # where it writes (its step.json goes there too)
    heldout: str = ""                  # tune: data.heldout_cluster
    train_clusters: tuple[str, ...] = ()   # tune: data.train_clusters (empty: all outside the exclusions)
    checkpoint: str = ""               # eval / prompt_tune: the step whose model it reads
    scored: tuple[str, ...] = ()       # eval: the clusters (or, with `datasets`, the datasets) it scores
    datasets: bool = False             # eval: `scored` names datasets
    per_dataset: bool = False          # eval: the summary reads each dataset's row, not the cluster mean
    labels: dict = field(default_factory=dict, hash=False)  # eval: x and group per model label ("tuned", "base")


@dataclass(frozen=True)
class Context:
    """What the command line adds to a definition: the config, the scale and the output root."""

    config: str
    scale: str
    out: Path

    def train_flags(self) -> tuple[str, ...]:
        return SMOKE_MODEL + SMOKE_TRAIN if self.scale == "smoke" else ()

    def tune_flags(self) -> tuple[str, ...]:
        return TINY_TUNE if self.scale == "tiny" else self.train_flags()

    def eval_flags(self) -> tuple[str, ...]:
        return SMOKE_EVAL if self.scale == "smoke" else ()


def list_experiments(folder: Path = EXPERIMENTS_DIR) -> list[dict]:
    return [load_experiment(p.stem, folder) for p in sorted(folder.glob("*.toml"))]


def load_experiment(name: str, folder: Path = EXPERIMENTS_DIR) -> dict:
    path = folder / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(folder.glob("*.toml")))
        raise ConfigError(f"experiment {name!r}: no {path}; known experiments: {known}")
    exp = tomllib.loads(path.read_text())
    missing = {"name", "title", "paper", "expand", "plot"} - set(exp)
    if missing or exp.get("expand") not in EXPANSIONS:
        raise ConfigError(f"{path}: needs name, title, paper, plot and expand (one of {', '.join(EXPANSIONS)}); "
                          f"missing {sorted(missing) or 'a known expand'}")
    return exp


def with_settings(exp: dict, settings: list[str]) -> dict:
    """The definition with `--set KEY=TOML_VALUE` overrides, e.g. shots=[0,8] or heldout="commonsense"."""
    out = dict(exp)
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in exp or key in ("name", "expand"):
            raise ConfigError(f"--set {item!r}: write KEY=VALUE with KEY one of "
                              f"{', '.join(k for k in exp if k not in ('name', 'expand'))}")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--set {item!r}: the value is not TOML ({e}); quote strings: {key}=\"...\"") from None
    return out


def training_datasets(registry: Registry, heldout: str, train_clusters: tuple[str, ...] = ()) -> list[str]:
    """The datasets a tune step's mixture may hold (the mixture's own rule, before local availability)."""
    from flan.mixture import eligible_tasks

    return sorted(t.name for t in eligible_tasks(registry, heldout or None, ",".join(train_clusters)))


# ---- step builders --------------------------------------------------------------------------------------------
def pretrain(ctx: Context, size: dict | None = None) -> Step:
    name = "base" + (f"-{size['name']}" if size else "")
    folder = ctx.out / "runs" / name
    return Step(name, "pretrain", ("pretrain", ctx.config, *ctx.train_flags(), *_model_flags(size),
                                   f"--train.run_dir={folder}"), folder)


def _model_flags(size: dict | None) -> tuple[str, ...]:
    """A [[sizes]] entry as --model flags: its own fields, or with `preset` every shape field of that config's
    [model] (the kernels stay the run's)."""
    if not size:
        return ()
    fields = {k: v for k, v in size.items() if k not in ("name", "preset")}
    if "preset" in size:
        from engine.config import KERNEL_FIELDS, load_config

        model = load_config(size["preset"]).model.__dict__
        fields = {**{k: v for k, v in model.items() if k not in KERNEL_FIELDS}, **fields}
    return tuple(f"--model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in fields.items())


def tune(ctx: Context, base: Step, heldout: str, *, train_clusters: tuple[str, ...] = (), templates: int = 0,
         fmt: str = "flan", size: dict | None = None) -> Step:
    knobs = [heldout] + ([f"c{len(train_clusters)}"] if train_clusters else []) + (
        [f"t{templates}"] if templates else []) + ([fmt] if fmt != "flan" else []) + ([size["name"]] if size else [])
    name = "tune-" + "-".join(knobs)
    folder = ctx.out / "runs" / name
    flags = [f"--data.heldout_cluster={heldout}", f"--train.init_from={base.folder}", f"--train.run_dir={folder}"]
    if train_clusters:
        flags.append(f"--data.train_clusters={','.join(train_clusters)}")
    if templates:
        flags.append(f"--data.templates_per_dataset={templates}")
    if fmt != "flan":
        flags.append(f"--data.instruction_format={fmt}")
    return Step(name, "tune", ("tune", ctx.config, *ctx.tune_flags(), *_model_flags(size), *flags), folder,
                heldout=heldout, train_clusters=tuple(train_clusters))


def evaluate(ctx: Context, exp: dict, name: str, model: Step, base: Step | None, scored: list[str], labels: dict,
             *, datasets: bool = False, per_dataset: bool = False, extra: tuple[str, ...] = ()) -> Step:
    folder = ctx.out / exp["name"] / "evals" / name
    argv = ("eval", ctx.config, "--checkpoint", str(model.folder), "--base", str(base.folder) if base else "none",
            "--datasets" if datasets else "--clusters", ",".join(scored), "--out", str(folder), *ctx.eval_flags(),
            *extra)
    return Step(name, "eval", argv, folder, checkpoint=model.name, scored=tuple(scored), datasets=datasets,
                per_dataset=per_dataset, labels=labels)


def _with_local_validation(registry: Registry, clusters: list[str], data_dir: Path | None) -> list[str]:
    from flan.loaders import has_split

    if data_dir is None:
        return clusters
    return [c for c in clusters if any(has_split(t, "validation", data_dir) for t in registry.in_cluster(c))]


# ---- the seven expansions -------------------------------------------------------------------------------------
def expand_heldout_clusters(exp, ctx, registry, data_dir):
    """Figure 5: one tuning run per evaluation cluster with local data, scored tuned vs base."""
    base = pretrain(ctx)
    steps = [base]
    for c in _with_local_validation(registry, exp["clusters"], data_dir):
        t = tune(ctx, base, c)
        steps += [t, evaluate(ctx, exp, f"eval-{c}", t, base, [c],
                              {"tuned": {"x": c, "group": "FLAN (tuned)"}, "base": {"x": c, "group": "base"}})]
    return steps


def expand_num_clusters(exp, ctx, registry, data_dir):
    """Figure 6: the untuned base (k = 0), then tuning on the first k clusters of the order, scored on every
    held-out cluster."""
    base = pretrain(ctx)
    heldout = exp["heldout"]
    excluded = {x for c in heldout for x in registry.excluded_clusters(c)}
    order = [c for c in exp["order"] if c not in excluded]  # FLAN's exclusions win over the paper's order
    per_cluster = {"x": 0, "group": "{cluster}"}
    steps = [base, evaluate(ctx, exp, "eval-base", base, None, heldout, {"tuned": per_cluster})]
    for k in range(1, len(order) + 1):
        t = tune(ctx, base, heldout[0], train_clusters=tuple(order[:k]))
        steps += [t, evaluate(ctx, exp, f"eval-c{k}", t, None, heldout, {"tuned": {"x": k, "group": "{cluster}"}})]
    return steps


def expand_scale(exp, ctx, registry, data_dir):
    """Figure 7: pretrain, tune and score tuned vs base at every [[sizes]] entry."""
    steps = []
    for size in exp["sizes"]:
        base = pretrain(ctx, size)
        t = tune(ctx, base, exp["heldout"], size=size)
        steps += [base, t, evaluate(ctx, exp, f"eval-{size['name']}", t, base, [exp["heldout"]],
                                    {"tuned": {"x": size["name"], "group": "FLAN (tuned)"},
                                     "base": {"x": size["name"], "group": "base"}})]
    return steps


def expand_templates(exp, ctx, registry, data_dir):
    """Section 4.4: the base, then one tuning run per templates-per-dataset count."""
    base = pretrain(ctx)
    heldout = [exp["heldout"]]
    steps = [base, evaluate(ctx, exp, "eval-base", base, None, heldout, {"tuned": {"x": 0, "group": "{cluster}"}})]
    for k in exp["templates"]:
        t = tune(ctx, base, exp["heldout"], templates=k)
        steps += [t, evaluate(ctx, exp, f"eval-t{k}", t, None, heldout, {"tuned": {"x": k, "group": "{cluster}"}})]
    return steps


def expand_instructions(exp, ctx, registry, data_dir):
    """Figure 8: one tuning run per training format, scored in each variant's evaluation format."""
    base = pretrain(ctx)
    steps, tuned = [base], {}
    for variant in exp["variants"]:
        train_fmt, eval_fmt = variant["train"], variant["eval"]
        if train_fmt not in tuned:
            tuned[train_fmt] = tune(ctx, base, exp["heldout"], fmt=train_fmt)
            steps.append(tuned[train_fmt])
        steps.append(evaluate(ctx, exp, f"eval-{train_fmt}-{eval_fmt}", tuned[train_fmt], None, [exp["heldout"]],
                              {"tuned": {"x": variant["label"], "group": "{cluster}"}},
                              extra=(f"--data.instruction_format={eval_fmt}",)))
    steps.append(evaluate(ctx, exp, "eval-base", base, None, [exp["heldout"]],
                          {"tuned": {"x": "untuned base", "group": "{cluster}"}}))
    return steps


def expand_few_shot(exp, ctx, registry, data_dir):
    """Figure 9: one tuning run, tuned and base scored with each exemplar count."""
    from flan.loaders import has_split

    base = pretrain(ctx)
    t = tune(ctx, base, exp["heldout"])
    steps = [base, t]
    # Exemplars come from the train split: every shot count scores the same datasets, those that have one.
    datasets = [d.name for d in registry.in_cluster(exp["heldout"]) if data_dir is None or (
        has_split(d, "validation", data_dir) and has_split(d, "train", data_dir))]
    for k in exp["shots"]:
        shots = f"{k}-shot" if k else "zero-shot"
        steps.append(evaluate(ctx, exp, f"eval-k{k}", t, base, datasets,
                              {"tuned": {"x": "FLAN (tuned)", "group": shots}, "base": {"x": "base", "group": shots}},
                              datasets=True, extra=(f"--eval.few_shot={k}",)))
    return steps


def expand_prompt_tuning(exp, ctx, registry, data_dir):
    """Figure 10: per dataset, prompts from the tuned model (its cluster held out) and from the base, with
    each training-set size, scored with the prompt on validation."""
    base = pretrain(ctx)
    steps, tuned = [base], {}
    for dataset in exp["datasets"]:
        cluster = registry.get(dataset).cluster
        if cluster not in tuned:
            tuned[cluster] = tune(ctx, base, cluster)  # the dataset's cluster held out, as in zero-shot
            steps.append(tuned[cluster])
        for source, model in (("tuned", tuned[cluster]), ("base", base)):
            for n in exp["examples"]:
                name = f"prompt-{source}-{dataset}-k{n}"
                folder = ctx.out / "runs" / name
                flags = SMOKE_TRAIN[:2] if ctx.scale == "smoke" else ()
                p = Step(name, "prompt_tune", ("prompt-tune", ctx.config, "--checkpoint", str(model.folder),
                                               "--dataset", dataset, "--prompt-length", str(exp["prompt_length"]),
                                               "--examples", str(n), "--out", str(folder), *flags,
                                               *exp.get("flags", ())), folder, checkpoint=model.name)
                label = {"x": dataset, "group": f"{'FLAN' if source == 'tuned' else 'base'}, "
                                                f"{n if n else 'all'} examples"}
                steps += [p, evaluate(ctx, exp, f"eval-{name}", model, None, [dataset], {"tuned": label},
                                      datasets=True, per_dataset=True,
                                      extra=("--prompt", str(folder / "prompt.safetensors")))]
    return steps


EXPANSIONS = {"heldout_clusters": expand_heldout_clusters, "num_clusters": expand_num_clusters,
              "scale": expand_scale, "templates": expand_templates, "instructions": expand_instructions,
              "few_shot": expand_few_shot, "prompt_tuning": expand_prompt_tuning}


def expand(exp: dict, ctx: Context, registry: Registry | None = None, data_dir: Path | None = None) -> list[Step]:
    """The experiment's steps in run order (dependencies first). `data_dir` drops clusters without local
    validation data where the definition says "where local data exists"; None keeps every listed cluster."""
    return EXPANSIONS[exp["expand"]](exp, ctx, registry or load_registry(), data_dir)
