"""Experiments: every definition's expansion checked against it (what trains, what is scored, no evaluation
dataset and no dataset FLAN excludes with it in training), the instruction-format variants, every experiment end
to end at --scale smoke (few_shot also re-run, reusing every step)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flan.experiments import Context, expand, list_experiments, load_experiment, training_datasets
from flan.registry import load_registry

REGISTRY = load_registry()
CTX = Context("configs/tiny.toml", "smoke", Path("/out"))
PAPER_ORDER = ["summarization", "translation", "reading_comprehension", "sentiment", "struct_to_text",
               "coreference", "paraphrase"]


def steps_of(name: str) -> dict:
    return {s.name: s for s in expand(load_experiment(name), CTX, REGISTRY)}


def scored_datasets(step) -> set[str]:
    return set(step.scored) if step.datasets else {t.name for c in step.scored for t in REGISTRY.in_cluster(c)}


def test_the_seven_experiments_are_listed():
    assert {e["name"] for e in list_experiments()} == {
        "heldout_clusters", "num_clusters", "scale", "templates", "instructions", "few_shot", "prompt_tuning"}


@pytest.mark.parametrize("name", [e["name"] for e in list_experiments()])
def test_no_scored_dataset_nor_its_flan_exclusions_train(name):
    steps = steps_of(name)
    for ev in (s for s in steps.values() if s.kind == "eval"):
        model = steps[ev.checkpoint]
        if model.kind != "tune":
            continue  # the base model saw no instruction data
        trained = set(training_datasets(REGISTRY, model.heldout, model.train_clusters))
        clusters = {REGISTRY.get(d).cluster for d in scored_datasets(ev)}
        forbidden = {t.name for c in clusters for x in REGISTRY.excluded_clusters(c) for t in REGISTRY.in_cluster(x)}
        assert trained and not trained & forbidden, (name, ev.name, sorted(trained & forbidden))
        assert str(model.folder) in ev.argv  # the eval reads the very run it names


def test_heldout_clusters_tunes_one_run_per_cluster_and_compares_with_base():
    steps = steps_of("heldout_clusters")
    evals = [s for s in steps.values() if s.kind == "eval"]
    assert {e.scored for e in evals} == {(c,) for c in load_experiment("heldout_clusters")["clusters"]}
    for e in evals:
        assert steps[e.checkpoint].heldout == e.scored[0] and e.argv[e.argv.index("--base") + 1] == "/out/runs/base"


def test_num_clusters_adds_clusters_in_the_papers_order_without_excluded_ones():
    steps = steps_of("num_clusters")
    tunes = [s for s in steps.values() if s.kind == "tune"]
    order = [c for c in PAPER_ORDER if c != "paraphrase"]  # NLI held out excludes paraphrase
    assert [t.train_clusters for t in tunes] == [tuple(order[:k]) for k in range(1, 7)]
    for t in tunes:
        assert f"--data.train_clusters={','.join(t.train_clusters)}" in t.argv
        assert {REGISTRY.get(d).cluster for d in training_datasets(REGISTRY, t.heldout, t.train_clusters)} == set(
            t.train_clusters)
    evals = [s for s in steps.values() if s.kind == "eval"]
    assert all(e.scored == ("nli", "closed_book_qa", "commonsense") for e in evals)
    assert [e.labels["tuned"]["x"] for e in evals] == list(range(7))  # 0 = the untuned base


def test_scale_templates_instructions_few_shot_and_prompt_tuning_set_their_knob():
    scale = steps_of("scale")
    sizes = load_experiment("scale")["sizes"]
    for size in sizes:
        assert f"--model.d_model={size['d_model']}" in scale[f"base-{size['name']}"].argv
        assert f"--model.d_model={size['d_model']}" in scale[f"tune-nli-{size['name']}"].argv
    templates = steps_of("templates")
    assert [a for s in templates.values() for a in s.argv if "templates_per_dataset" in a] == [
        f"--data.templates_per_dataset={k}" for k in (1, 4, 10)]
    instr = steps_of("instructions")
    assert "--data.instruction_format=none" in instr["tune-nli-none"].argv
    assert "--data.instruction_format=flan" in instr["eval-none-flan"].argv
    assert "--data.instruction_format=dataset_name" in instr["eval-dataset_name-dataset_name"].argv
    few = steps_of("few_shot")
    assert "--eval.few_shot=4" in few["eval-k4"].argv and "--eval.few_shot=0" in few["eval-k0"].argv
    prompts = steps_of("prompt_tuning")
    p = prompts["prompt-tuned-rte-k32"]
    assert p.kind == "prompt_tune" and prompts[p.checkpoint].heldout == "nli" and "32" in p.argv
    assert prompts["prompt-base-cb-k0"].checkpoint == "base"
    assert str(p.folder / "prompt.safetensors") in prompts["eval-prompt-tuned-rte-k32"].argv


def test_instruction_formats_render_inputs_alone_or_after_the_dataset_name():
    from flan.templates import load_templates, render_template

    spec = REGISTRY.get("rte")
    row = {"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": "entailment"}
    template = load_templates(spec)[0]
    flan = render_template(spec, template, row, "flan")
    bare = render_template(spec, template, row, "none")
    named = render_template(spec, template, row, "dataset_name")
    assert bare.prompt.startswith("A dog runs.\nAn animal moves.\n\nOPTIONS:\n- yes")
    assert named.prompt == "[Natural language inference: RTE] " + bare.prompt
    assert flan.prompt != bare.prompt and "A dog runs." in flan.prompt
    assert flan.target == bare.target == named.target and flan.options == bare.options == named.options


def test_mixture_knobs_pick_clusters_and_templates(shared_data):
    from flan.mixture import Mixture

    mix = Mixture.build(REGISTRY, heldout="nli", split="train", data_dir=shared_data, cap=10, seed=0,
                        train_clusters="sentiment,coreference", templates_per_dataset=2)
    assert {t.cluster for t in mix.tasks} == {"sentiment", "coreference"}
    assert all(len(t) <= 2 for t in mix.templates.values())


def test_few_shot_runs_end_to_end_at_smoke_scale_and_reuses_its_steps(tmp_path, shared_data, capsys):
    from flan.cli import main

    argv = ["experiment", "run", "few_shot", "--scale", "smoke", "--out", str(tmp_path)]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "few_shot" / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["base", "tune-nli", "eval-k0", "eval-k4"]
    assert {(r["x"], r["group"]) for r in summary["rows"]} == {
        (m, k) for m in ("FLAN (tuned)", "base") for k in ("zero-shot", "4-shot")}
    # Each step scored tuned and base: one paired difference each, with its verdict.
    assert [(d["step"], d["scored"]) for d in summary["differences"]] == [("eval-k0", "nli"), ("eval-k4", "nli")]
    assert all(isinstance(d["within_noise"], bool) for d in summary["differences"])
    assert (tmp_path / "few_shot" / "summary.png").is_file()
    assert "| FLAN (tuned) |" in (tmp_path / "few_shot" / "summary.md").read_text()
    assert main([*argv, "--dry-run"]) == 0
    assert "[tune-nli] done: flan tune configs/tiny.toml" in capsys.readouterr().out
    assert main(argv) == 0  # the second run reuses every finished step
    again = json.loads((tmp_path / "few_shot" / "summary.json").read_text())
    assert all(s["reused"] for s in again["steps"]) and again["rows"] == summary["rows"]


def test_settings_override_the_definition_and_sizes_may_name_presets():
    from engine.config import ConfigError, load_config
    from flan.experiments import with_settings

    exp = with_settings(load_experiment("scale"), ['sizes=[{name="125m", preset="configs/gpu-125m.toml"}]'])
    steps = {s.name: s for s in expand(exp, CTX, REGISTRY)}
    model = load_config("configs/gpu-125m.toml").model
    assert f"--model.d_model={model.d_model}" in steps["base-125m"].argv
    assert f"--model.n_layers={model.n_layers}" in steps["tune-nli-125m"].argv
    few = with_settings(load_experiment("few_shot"), ["shots=[0, 8]"])
    assert [s.name for s in expand(few, CTX, REGISTRY) if s.kind == "eval"] == ["eval-k0", "eval-k8"]
    with pytest.raises(ConfigError, match="KEY one of"):
        with_settings(load_experiment("few_shot"), ["nope=1"])


def test_step_states_continue_interrupted_training_and_refuse_another_command(tmp_path):
    import torch

    from engine.checkpoint import save_weights
    from engine.config import ConfigError
    from flan.experiment_cli import STEP_FILE, step_state

    ctx = Context("configs/tiny.toml", "smoke", tmp_path)
    base = expand(load_experiment("few_shot"), ctx, REGISTRY)[0]
    assert step_state(base) == "new"
    save_weights(base.folder, 1, {"w": torch.zeros(2)}, {"config": {}}, keep=1)
    assert step_state(base) == "resume"  # checkpoints without step.json: an interrupted run continues
    (base.folder / STEP_FILE).write_text(json.dumps({"argv": list(base.argv)}))
    assert step_state(base) == "done"
    (base.folder / STEP_FILE).write_text(json.dumps({"argv": ["pretrain", "other.toml"]}))
    with pytest.raises(ConfigError, match="choose another --out"):
        step_state(base)


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")  # shared: the experiments reuse the base model and tuning runs


@pytest.mark.parametrize("name", ["heldout_clusters", "num_clusters", "scale", "templates", "instructions",
                                  "prompt_tuning"])
def test_each_experiment_runs_end_to_end_at_smoke_scale(name, smoke_out, shared_data):
    """Every step finishes, every eval step contributes a summary row, and the figure is drawn."""
    from flan.cli import main

    assert main(["experiment", "run", name, "--scale", "smoke", "--out", str(smoke_out)]) == 0
    summary = json.loads((smoke_out / name / "summary.json").read_text())
    assert summary["finished"]
    evals = {s["name"] for s in summary["steps"] if s["kind"] == "eval"}
    assert evals and {r["step"] for r in summary["rows"] if r["step"] != "mean"} == evals  # "mean": the average curve
    assert all(r["n"] > 0 and 0.0 <= r["value"] <= 100.0 for r in summary["rows"])
    assert {d["step"] for d in summary["differences"]} <= evals
    assert (smoke_out / name / "summary.png").stat().st_size > 0
