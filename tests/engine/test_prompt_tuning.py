"""Prompt tuning: the lengthened batch, the prompted forward against an explicit reference (with and without a KV
cache), a frozen model (bit-identical weights, no gradients, optimizer state for the prompt only), a falling
loss, the Triton kernels, tp=2 (with and without sequence parallelism) and dp=2 equal to one device on gloo processes,
the saved prompt's provenance, and a zero-length prompt scoring exactly as no prompt."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from parallel.launch import launch

from engine.batch import IGNORE_INDEX, Batch
from engine.config import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, resolve_auto
from engine.model import build_model
from engine.optim import build_optimizer
from engine.prompt_tuning import (SoftPrompt, attach, attach_to_layout, insert_slots, load_prompt, prompt_step,
                                  sampled_vocab_init, save_prompt, tune_prompt)
from flan.scorer import greedy_generate, option_logprobs

MODEL = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=32, init_std=0.1)
STEPS = 30


def make_config(tp: int = 1, sp: bool = False, **model) -> Config:
    cfg = Config(model=ModelConfig(**{**MODEL, **model}), parallel=ParallelConfig(tp=tp, sp=sp),
                 optim=OptimConfig(lr=3e-2, eps=1e-6, weight_decay=0.0, grad_clip=1.0, warmup_steps=0,
                                   schedule="constant"), data=DataConfig(seq_len=16))
    cfg.train.steps = STEPS
    return resolve_auto(cfg.validate("test"), cuda_available=False)


def example_batch(seed: int = 0, rows: int = 4, width: int = 12) -> Batch:
    """One example per row, right-padded: an input without labels, then a 4-token target that is the same in
    every row (what a prompt can learn to steer a frozen random model towards)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, MODEL["vocab_size"], (rows, width), generator=gen)
    labels = torch.full((rows, width), IGNORE_INDEX)
    segments = torch.zeros(rows, width, dtype=torch.int32)
    for r in range(rows):
        length = width - r
        segments[r, :length] = 1
        labels[r, length - 4:length] = torch.tensor([7, 8, 9, 3])
    return Batch(tokens, labels, segments)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 5), st.lists(st.tuples(st.integers(0, 4), st.integers(1, 6)), min_size=1, max_size=4))
def test_slots_sit_before_each_rows_first_token(n, rows):
    """(left padding, tokens) per row: the slots follow the padding, and removing them gives the batch back."""
    width = max(p + k for p, k in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    segments = torch.zeros(len(rows), width, dtype=torch.int32)
    for r, (pad, k) in enumerate(rows):
        tokens[r, pad:pad + k] = torch.arange(5, 5 + k)
        segments[r, pad:pad + k] = 1
    batch = Batch(tokens, tokens.clone(), segments)
    longer, slots = insert_slots(batch, n)
    keep = ~slots.mask
    for r, (pad, k) in enumerate(rows):
        assert slots.index[r, pad:pad + n].tolist() == list(range(n))
        assert longer.segment_ids[r, pad:pad + n].tolist() == [1] * n
        assert longer.labels[r][slots.mask[r]].tolist() == [IGNORE_INDEX] * n
        assert longer.positions[r, pad:pad + n + k].tolist() == list(range(n + k))  # the prompt, then the example
    for name in ("tokens", "labels", "segment_ids"):
        assert torch.equal(getattr(longer, name)[keep].view(batch.tokens.shape), getattr(batch, name))


def reference_hidden(model, prompt: SoftPrompt, ids: list[int]) -> torch.Tensor:
    """Logits of [prompt vectors] + ids, built by hand (no hooks): one segment, positions 0..N+len-1."""
    n = prompt.length
    h = torch.cat([prompt.weight, model.tok_embeddings(torch.tensor(ids))])[None]
    return model(Batch(torch.zeros(1, n + len(ids), dtype=torch.long)), hidden=h)[0, n:]


def test_prompted_scores_equal_the_explicit_prompt_sequence():
    model = build_model(make_config().model, seed=1).eval()
    prompt = SoftPrompt(torch.randn(3, MODEL["d_model"], generator=torch.Generator().manual_seed(2)))
    contexts, options = [[5, 6, 7, 8], [9, 10]], [[[11], [12, 13]], [[14, 15, 16]]]
    with torch.no_grad():
        want = [[sum(reference_hidden(model, prompt, c + o).float().log_softmax(-1)[len(c) - 1 + j, t].item()
                     for j, t in enumerate(o)) for o in opts] for c, opts in zip(contexts, options)]
        hooks = attach(model, prompt)
        try:
            got = option_logprobs(model, contexts, options, pad_id=0)  # left-padded, KV cache for continuations
            logits = model(Batch(torch.tensor([[5, 6, 7, 8]])))
        finally:
            hooks.remove()
    assert got == [pytest.approx(w, abs=1e-5) for w in want]
    assert logits.shape == (1, 4, MODEL["vocab_size"])  # the slots are cut from per-position outputs
    assert torch.allclose(logits[0], reference_hidden(model, prompt, [5, 6, 7, 8]), atol=1e-5)


def test_zero_length_prompt_scores_exactly_as_no_prompt():
    model = build_model(make_config().model, seed=1).eval()
    contexts, options = [[5, 6, 7, 8], [9, 10]], [[[11], [12, 13]], [[14, 15, 16]]]
    plain = option_logprobs(model, contexts, options, pad_id=0)
    plain_gen = greedy_generate(model, contexts, eos_id=3, pad_id=0, max_new_tokens=4)
    hooks = attach(model, SoftPrompt(sampled_vocab_init(model.tok_embeddings.weight, 0, seed=0)))
    try:
        assert option_logprobs(model, contexts, options, pad_id=0) == plain
        assert greedy_generate(model, contexts, eos_id=3, pad_id=0, max_new_tokens=4) == plain_gen
    finally:
        hooks.remove()


def train_prompt(cfg: Config, mesh=None, steps: int = STEPS) -> dict:
    """`steps` prompt steps on example_batch (this rank's rows of it) from the same seeded model and prompt."""
    from engine.data_source import rank_rows
    from engine.parallel import Mesh, parallelize

    mesh = mesh or Mesh()
    model = build_model(cfg.model, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = SoftPrompt(sampled_vocab_init(model.tok_embeddings.weight, 4, seed=5))
    model.requires_grad_(False)
    layout = parallelize(model, cfg, mesh)
    hooks = attach_to_layout(layout, prompt)
    optimizer = build_optimizer(prompt, cfg)
    rows = rank_rows(example_batch(), mesh.dp_rank, mesh.dp)
    losses = [prompt_step(layout, prompt, optimizer, rows, step, steps)["loss"] for step in range(steps)]
    hooks.remove()
    return {"losses": losses, "prompt": prompt.weight.detach().clone(), "layout": layout, "before": before,
            "optimizer": optimizer, "model": model}


def test_model_is_frozen_and_the_prompt_loss_falls():
    run = train_prompt(make_config())
    after = run["model"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in run["before"].items())  # bit-identical
    assert all(p.grad is None for p in run["model"].parameters())
    state_params = [p for p in run["optimizer"].state]
    assert len(state_params) == 1 and state_params[0].shape == (4, MODEL["d_model"])
    # A 16-wide random model steered by 4 vectors: the loss falls steadily (a broken gradient leaves it flat).
    assert run["losses"][-1] < 0.98 * run["losses"][0] and run["losses"] == sorted(run["losses"], reverse=True)


def test_triton_kernels_match_torch():
    shape = dict(n_heads=2, n_kv_heads=1, head_dim=32)  # a head size the flash kernel takes
    torch_run = train_prompt(make_config(**shape), steps=3)
    triton_run = train_prompt(make_config(attention="triton", loss="triton", **shape), steps=3)
    assert triton_run["losses"] == pytest.approx(torch_run["losses"], rel=1e-4)
    assert torch.allclose(triton_run["prompt"], torch_run["prompt"], atol=1e-4)


def parallel_worker(tp: int, sp: bool) -> dict:
    from engine.parallel import init_mesh

    cfg = make_config(tp=tp, sp=sp)
    run = train_prompt(cfg, init_mesh(cfg), steps=5)
    return {"losses": run["losses"], "prompt": run["prompt"].tolist()}


@pytest.mark.parametrize("tp, sp", [(2, False), (2, True), (1, False)], ids=["tp2", "tp2-sp", "dp2"])
def test_parallel_prompt_equals_one_device(tp, sp):
    """tp=2 (the prompt's gradient whole on every rank, or summed over the sequence chunks) and dp=2 (two rows
    each, summed over replicas) against one device on the same weights and batch."""
    single = train_prompt(make_config(), steps=5)
    for rank in launch(parallel_worker, 2, tp, sp):
        assert rank["losses"] == pytest.approx(single["losses"], rel=1e-5)
        # Adam's step m / sqrt(v) is scale-free, so fp32 rounding of the reduced gradient (another summation
        # order) moved an element by up to 1.7e-5 over 5 steps (torch 2.13.0, fresh venv); 5e-5 stays under
        # 1/500 of one step (lr 3e-2).
        assert torch.allclose(torch.tensor(rank["prompt"]), single["prompt"], rtol=1e-5, atol=5e-5)


class Repeat:
    """A BatchSource serving the same batch forever."""

    def __init__(self, batch):
        self.batch = batch

    def next_batch(self):
        return self.batch


def test_tune_prompt_saves_only_the_prompt_with_provenance(tmp_path):
    from safetensors import safe_open

    from engine.checkpoint import save_weights

    cfg = make_config()
    cfg.train.steps = 10
    step = save_weights(tmp_path / "run", 1, build_model(cfg.model, seed=3).state_dict(), {"config": cfg.to_dict()},
                        keep=1)
    summary = tune_prompt(cfg, step, lambda c, r, s: Repeat(example_batch()), 4, tmp_path / "p", {"dataset": "x"})
    assert summary["loss"] < summary["first_loss"]
    with safe_open(str(tmp_path / "p" / "prompt.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["prompt"]
    prompt, provenance = load_prompt(tmp_path / "p" / "prompt.safetensors")
    assert prompt.weight.shape == (4, MODEL["d_model"])
    assert provenance["dataset"] == "x" and provenance["checkpoint"] == str(step) and provenance["steps"] == 10
    assert (tmp_path / "p" / "run.json").is_file() and (tmp_path / "p" / "metrics.jsonl").is_file()
    with pytest.raises(ValueError, match="already holds prompt.safetensors"):
        tune_prompt(cfg, step, lambda c, r, s: Repeat(example_batch()), 4, tmp_path / "p", {})


def test_commands_prompt_tune_then_eval_with_a_zero_length_prompt_equal_plain_eval(tmp_path, shared_data):
    import json

    from engine.checkpoint import save_weights
    from engine.config import load_config
    from engine.tokenizer import load_tokenizer
    from flan.cli import main

    tok = load_tokenizer(load_config("configs/tiny.toml"))
    cfg = Config(model=ModelConfig(**{**MODEL, "vocab_size": tok.vocab_size, "d_model": 32}))
    cfg.data.tokenizer, cfg.train.run_dir = str(tok.path), str(tmp_path / "run")
    save_weights(tmp_path / "run", 1, build_model(cfg.model, seed=0).state_dict(), {"config": cfg.to_dict()}, keep=1)
    tune = ["prompt-tune", "configs/tiny.toml", "--checkpoint", str(tmp_path / "run"), "--dataset", "rte",
            "--examples", "8", "--train.steps=2", "--train.batch_size=4", "--optim.warmup_steps=0"]
    assert main([*tune, "--prompt-length", "2"]) == 0
    assert main([*tune, "--prompt-length", "0"]) == 2  # nothing to train: one message, usage status
    prompt, provenance = load_prompt(tmp_path / "run" / "prompts" / "rte-p2-k8" / "prompt.safetensors")
    assert provenance["examples"] == 8 and provenance["dataset"] == "rte" and prompt.weight.shape == (2, 32)
    save_prompt(tmp_path / "empty.safetensors", SoftPrompt(prompt.weight[:0]), {})

    def scores(*flags):
        out = tmp_path / f"eval{len(flags)}"
        assert main(["eval", "configs/tiny.toml", "--checkpoint", str(tmp_path / "run"), "--base", "none",
                     "--datasets", "rte", "--templates", "0", "--limit", "6", "--out", str(out), *flags]) == 0
        return [(r["metric"], r["split"], r["value"]) for r in json.loads((out / "scores.json").read_text())["rows"]]

    assert scores("--prompt", str(tmp_path / "empty.safetensors")) == scores()


def test_pipeline_parallelism_is_refused_with_the_flag_named(tmp_path):
    from engine.config import ConfigError

    cfg = make_config()
    cfg.parallel.pp = 2
    with pytest.raises(ConfigError, match="--parallel.pp"):
        tune_prompt(cfg, tmp_path, lambda c, r, s: Repeat(example_batch()), 4, tmp_path / "p", {})


def test_example_rows_hold_one_example_each_from_the_first_k(shared_data):
    from engine.config import load_config
    from engine.tokenizer import load_tokenizer
    from flan.prompt_tune_cli import ExampleRows
    from flan.registry import load_registry

    cfg = load_config("configs/tiny.toml", ["--train.batch_size=8", "--parallel.tp=2", "--parallel.sp=true"])
    rows = ExampleRows(cfg, load_tokenizer(cfg), load_registry().get("rte"), examples=3, prompt_length=5)
    seen = set()
    for _ in range(3):
        batch = rows.next_batch()
        assert batch.tokens.shape[0] == 8 and (batch.tokens.shape[1] + 5) % 2 == 0  # sp splits prompt + row
        assert set(batch.segment_ids.unique().tolist()) <= {0, 1}  # one example per row
        seen |= {tuple(r[s == 1].tolist()) for r, s in zip(batch.tokens, batch.segment_ids)}
    assert len(seen) == 3  # the first 3 of the seeded order, epoch after epoch
