"""Scorer: shared-prompt option scores equal full-sequence log-likelihoods; generation equals naive greedy;
evaluation splits, template choice, report summaries and the `flan eval` command end to end."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from engine.batch import Batch
from engine.checkpoint import save_weights
from engine.config import Config, ModelConfig, load_config
from engine.model import build_model
from flan.evaluate import EvalError, build_requests, dev_test_rows, eval_templates
from flan.registry import load_registry
from flan.scorer import (EvalRequest, RankResult, cut_at_stop, greedy_generate, option_logprobs, rank_classify,
                         score_requests)

VOCAB = 1000


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48)
    return build_model(cfg, seed=3).eval()


def full_logprob(model, context, option):
    """Reference: one forward pass over context + option, summing the option tokens' log-probabilities."""
    with torch.no_grad():
        logp = model(Batch(torch.tensor([context + option]))).float().log_softmax(-1)[0]
    return sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(option))


ids = st.integers(4, VOCAB - 1)


@settings(max_examples=8, deadline=None)
@given(st.lists(st.tuples(st.lists(ids, min_size=1, max_size=12),
                          st.lists(st.lists(ids, min_size=1, max_size=4), min_size=1, max_size=4)),
                min_size=1, max_size=4))
def test_shared_prompt_scores_equal_full_sequence(model, batch):
    contexts, options = [c for c, _ in batch], [o for _, o in batch]
    got = option_logprobs(model, contexts, options, pad_id=0)
    for c, opts, scores in zip(contexts, options, got):
        for o, s in zip(opts, scores):
            assert s == pytest.approx(full_logprob(model, c, o), abs=1e-5)


def test_single_token_options_need_no_continuation_pass(model):
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        option_logprobs(model, [[5, 6, 7], [8, 9]], [[[10], [11]], [[12], [13], [14]]], pad_id=0)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_empty_option_is_refused(model):
    with pytest.raises(ValueError, match="encodes to no tokens"):
        option_logprobs(model, [[5, 6]], [[[7], []]], pad_id=0)


def requests_for(texts, options=("yes", "no", "maybe so")):
    return [EvalRequest("rte", 0, i, t, options[0], tuple(options), 0) for i, t in enumerate(texts)]


def test_rank_classify_keeps_request_order_and_is_batch_invariant(model, word_tokenizer):
    texts = ["a b c d e f", "one", "x y z", "long " * 20 + "end", "p q"]
    reqs = requests_for(texts)
    one = rank_classify(model, word_tokenizer, reqs, batch_size=1, input_len=64)
    many = rank_classify(model, word_tokenizer, reqs, batch_size=3, input_len=64)
    for r, a, b in zip(reqs, one, many):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        ctx = word_tokenizer.encode(r.prompt)
        for opt, lp in zip(r.options, a.logprobs):
            assert lp == pytest.approx(full_logprob(model, ctx, word_tokenizer.encode(opt)), abs=1e-5)
    assert one[0].n_tokens == (1, 1, 2) and one[0].n_bytes == (3, 2, 8)


def test_input_budget_keeps_the_prompt_end(model, word_tokenizer):
    req = requests_for(["w%d" % i for i in range(30)])
    cut = rank_classify(model, word_tokenizer, req, batch_size=1, input_len=8)[0]
    ctx = word_tokenizer.encode(req[0].prompt)[-8:]
    assert cut.logprobs[0] == pytest.approx(full_logprob(model, ctx, word_tokenizer.encode("yes")), abs=1e-5)


def test_length_normalised_predictions():
    r = RankResult(logprobs=(-3.0, -4.0, -5.0), n_tokens=(1, 2, 5), n_bytes=(2, 8, 4))
    assert (r.prediction, r.prediction_per_token, r.prediction_per_byte) == (0, 2, 1)


def naive_greedy(model, prompt, steps, eos):
    seq = list(prompt)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(Batch(torch.tensor([seq])))[0, -1].argmax().item()
        if nxt == eos:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


def test_greedy_generation_matches_recomputing_every_step(model):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    got = greedy_generate(model, prompts, eos_id=3, pad_id=0, max_new_tokens=6)
    for p, g in zip(prompts, got):
        assert g == naive_greedy(model, p, 6, eos=3)


def test_generation_stops_at_eos_and_stop_strings(model, word_tokenizer):
    prompt = [5, 6, 7]
    free = naive_greedy(model, prompt, 6, eos=-1)
    stopped = greedy_generate(model, [prompt], eos_id=free[2], pad_id=0, max_new_tokens=6)[0]
    assert stopped == free[:free.index(free[2])]
    stop = f"<{free[1]}>"
    cut = greedy_generate(model, [prompt], eos_id=-1, pad_id=0, max_new_tokens=6,
                          stop_at=lambda ids: stop in word_tokenizer.decode(ids))[0]
    assert cut == free[:free.index(free[1]) + 1]
    assert cut_at_stop("answer\n\nnext", ["\n\n"]) == "answer" and cut_at_stop("abc", []) == "abc"


def test_score_requests_dispatches_by_options(model, word_tokenizer):
    reqs = requests_for(["a b", "c d"]) + [EvalRequest("dart", 0, 5, "e f g", "h i")]
    out = score_requests(model, word_tokenizer, reqs, batch_size=2, input_len=32, max_new_tokens=3)
    assert isinstance(out[0], RankResult) and isinstance(out[1], RankResult)
    assert len(out[2].tokens) <= 3 and isinstance(out[2].text, str)


# ---- evaluation plan -------------------------------------------------------------------------------------
def test_dev_and_test_halves_are_disjoint_seeded_and_limited():
    dev, test = dev_test_rows(10, limit=0)
    assert sorted(dev + test) == list(range(10)) and len(dev) == 5
    assert dev_test_rows(10, 0) == (dev, test)
    small_dev, small_test = dev_test_rows(10, limit=4)
    assert len(small_dev) == len(small_test) == 2 and set(small_dev) | set(small_test) <= set(range(10))


def test_template_choice_excludes_turned_around():
    rte = load_registry().get("rte")
    usable = eval_templates(rte, "all")
    assert 8 not in usable and 0 in usable  # rte's template 8 writes a hypothesis (turned around)
    assert eval_templates(rte, "0,3") == [0, 3]
    with pytest.raises(EvalError, match="no usable template 8"):
        eval_templates(rte, "0,8")
    with pytest.raises(EvalError, match="comma list of indices"):
        eval_templates(rte, "first")


def test_requests_render_options_gold_and_few_shot(shared_data):
    from flan.loaders import load_split

    rte = load_registry().get("rte")
    rows = load_split(rte, "validation", data_dir=shared_data).rows
    train = load_split(rte, "train", data_dir=shared_data).rows
    zero = build_requests(rte, rows, [0, 1], 0)
    assert zero[0].options == ("yes", "no") and zero[0].target == zero[0].options[zero[0].gold]
    shot = build_requests(rte, rows, [0], 0, few_shot=2, train_rows=train)[0]
    assert shot.prompt.endswith(zero[0].prompt) and shot.prompt.count("OPTIONS:") == 3
    nq = load_registry().get("natural_questions")
    qa_rows = load_split(nq, "validation", data_dir=shared_data).rows
    qa = build_requests(nq, qa_rows, [0], 0)[0]
    assert qa.options is None and qa.references[0] == qa.target
    assert set(qa.references) == {qa.target, *qa_rows[0]["answers"]}


# ---- the command ---------------------------------------------------------------------------------------
def run_flan(argv):
    from flan.cli import main  # the one place errors become a line and an exit code

    return main(argv)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data):
    from engine.tokenizer import load_tokenizer

    cfg = load_config("configs/tiny.toml")
    tok = load_tokenizer(cfg)
    run = tmp_path_factory.mktemp("run")
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   head_dim=8, d_ff=48))
    cfg.data.tokenizer, cfg.train.run_dir = str(tok.path), str(run)
    model = build_model(cfg.model, seed=0)
    save_weights(run, 1, model.state_dict(), {"config": cfg.to_dict()}, keep=1)
    return run


def test_eval_command_writes_scores_for_tuned_and_base(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    code = run_flan(["eval", "configs/tiny.toml", "--checkpoint", str(tiny_run), "--base", str(tiny_run),
                     "--datasets", "rte,common_gen", "--templates", "0,1", "--limit", "4", "--out", str(out),
                     "--eval.max_new_tokens=3"])
    assert code == 0
    rows = json.loads((out / "scores.json").read_text())["rows"]
    tuned = {(r["dataset"], r["metric"]) for r in rows if r["model"] == "tuned" and r["template"] == "mean"}
    assert {("rte", "acc"), ("rte", "acc_norm_byte"), ("common_gen", "rougeL")} <= tuned
    same = [(a["value"], b["value"]) for a in rows for b in rows if a["model"] == "tuned" and b["model"] == "base"
            and (a["dataset"], a["template"], a["metric"], a["split"]) == (b["dataset"], b["template"],
                                                                          b["metric"], b["split"])]
    assert same and all(a == b for a, b in same)  # the same weights score the same
    assert (out / "heldout.png").is_file() and "| rte | nli | acc |" in capsys.readouterr().out
    samples = [json.loads(line) for line in (out / "samples" / "rte.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 4  # models x templates x examples (dev and test halves)
    s = samples[0]
    assert {"model", "template", "example", "split", "prompt", "options", "gold", "logprobs", "option_tokens",
            "option_bytes", "predictions", "metrics", "truncated"} <= set(s)
    assert s["metrics"]["acc"] == float(s["predictions"]["acc"] == s["gold"])
    gen = json.loads((out / "samples" / "common_gen.jsonl").read_text().splitlines()[0])
    assert {"text", "references"} <= set(gen) and "rougeL" in gen["metrics"]


def test_rows_with_an_option_without_text_are_left_out_and_reported(tiny_run, tmp_path, shared_data, capsys):
    """The shared ARC sample pads 3-choice questions with "" and lost every option's text in some rows: eval
    scores the rest (rank classification cannot score an option of no tokens) and says how many it left."""
    from flan.evaluate import scorable_rows
    from flan.loaders import load_split

    arc = load_registry().get("arc_easy")
    rows = load_split(arc, "validation", data_dir=shared_data).rows
    keep, unscored = scorable_rows(arc, rows)
    empty = [r for r in rows if any(not o.strip() for o in r["options"])]
    assert empty and unscored == len(empty) and len(keep) + unscored == len(rows)
    assert all(all(o.strip() for o in r["options"]) for r in keep)
    out = tmp_path / "eval"
    code = run_flan(["eval", "configs/tiny.toml", "--checkpoint", str(tiny_run), "--base", "none", "--datasets",
                     "arc_easy", "--templates", "0", "--limit", str(len(rows)), "--out", str(out), "--no-samples"])
    assert code == 0
    captured = capsys.readouterr()
    assert f"arc_easy: {unscored} validation rows have an option without text" in captured.err
    mean = [r for r in json.loads((out / "scores.json").read_text())["rows"]
            if r["template"] == "mean" and r["dataset"] == "arc_easy"]
    assert mean and all(r["unscored"] == unscored and r["n"] == len(keep) for r in mean)
    assert f"- arc_easy: {unscored} rows" in (out / "scores.md").read_text()


def test_eval_command_errors_name_the_argument(tiny_run, tmp_path, capsys):
    assert run_flan(["eval", "configs/tiny.toml", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert run_flan(["eval", "configs/tiny.toml", "--checkpoint", str(tiny_run), "--datasets", "nope"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert run_flan(["eval", "configs/tiny.toml", "--checkpoint", str(tiny_run), "--datasets", "rte",
                     "--templates", "x"]) == 2
    assert "--templates 'x'" in capsys.readouterr().err
    assert run_flan(["eval", "configs/tiny.toml", "--checkpoint", str(tiny_run), "--datasets", "rte",
                     "--clusters", "nli"]) == 2
    assert "not both" in capsys.readouterr().err
    assert run_flan(["export-hf", str(tiny_run), str(tmp_path / "hf"), "--eval.limit=3"]) == 2
    assert "takes no --section.field overrides" in capsys.readouterr().err
