"""Mixture: capped examples-proportional rates, held-out clusters, seeded order, exact resume."""
import json
from collections import Counter

import pytest
import torch

from engine.config import Config
from flan.mixture import ExampleStream, Mixture, TuningStream, mixing_rates
from flan.registry import load_registry

REG = load_registry()


def test_rates_equal_the_capped_formula():
    rates = mixing_rates({"big": 5000, "mid": 1000, "tiny": 10}, cap=3000)
    assert rates == pytest.approx({"big": 3000 / 4010, "mid": 1000 / 4010, "tiny": 10 / 4010})
    with pytest.raises(ValueError, match="cap is 0"):
        mixing_rates({"a": 1}, cap=0)


def _mixture(shared_data, cap=40, seed=0, heldout="nli", split="train"):
    return Mixture.build(REG, heldout=heldout, split=split, data_dir=shared_data, cap=cap, seed=seed)


def test_an_epoch_realises_the_rates_exactly(shared_data):
    mix = _mixture(shared_data, cap=300)
    assert mix.rates == pytest.approx({n: min(k, 300) / sum(min(v, 300) for v in mix.sizes.values())
                                       for n, k in mix.sizes.items()})
    assert mix.sizes["imdb_reviews"] == 5 and mix.per_epoch["imdb_reviews"] == 5
    assert mix.sizes["sst2"] == 2000 and mix.per_epoch["sst2"] == 300
    tasks, rows, templates = mix.epoch_order(0)
    names = [t.name for t in mix.tasks]
    assert Counter(names[i] for i in tasks) == Counter(mix.per_epoch)
    for i, spec in enumerate(mix.tasks):  # a sample without repeats, templates in range
        picked = rows[tasks == i]
        assert len(set(picked.tolist())) == len(picked) and picked.max() < mix.sizes[spec.name]
        assert templates[tasks == i].max() < len(mix.templates[spec.name])


def test_held_out_clusters_and_missing_data(shared_data):
    mix = _mixture(shared_data)
    clusters = {t.cluster for t in mix.tasks}
    assert not clusters & {"nli", "paraphrase"}
    assert {"fix_punct", "math_dataset"} <= set(mix.sizes), "derived datasets mix like any other"
    assert "squad" in mix.missing and "sentiment140" in mix.missing  # no local train split
    rc = _mixture(shared_data, heldout="reading_comprehension")
    assert {"rte", "stsb"} <= set(rc.sizes) and not {"bool_q", "record", "cosmos_qa"} & set(rc.sizes)


def test_order_is_seeded(shared_data):
    a, b, c = _mixture(shared_data, seed=1), _mixture(shared_data, seed=1), _mixture(shared_data, seed=2)
    assert all((x == y).all() for x, y in zip(a.epoch_order(0), b.epoch_order(0)))
    assert not (a.epoch_order(0)[1] == c.epoch_order(0)[1]).all()
    assert not (a.epoch_order(0)[1] == a.epoch_order(1)[1]).all(), "each epoch reshuffles"


def test_example_stream_crosses_epochs_and_restores(shared_data):
    mix = _mixture(shared_data, cap=3)
    stream = ExampleStream(mix)
    first = stream.take(mix.epoch_len + 5)
    assert (stream.epoch, stream.index) == (1, 5)
    again = ExampleStream(mix, 0, mix.epoch_len - 2).take(7)
    assert again == first[mix.epoch_len - 2:]


def _cfg(batch_size=4, input_len=48, target_len=16):
    cfg = Config()
    cfg.train.batch_size, cfg.data.input_len, cfg.data.target_len = batch_size, input_len, target_len
    return cfg


def _same(x, y):
    return all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("tokens", "labels", "segment_ids", "positions"))


def test_tuning_stream_resumes_exactly(shared_data, word_tokenizer):
    mix = _mixture(shared_data, cap=8)  # a short epoch, so the run below crosses epoch boundaries
    cfg = _cfg()
    run = TuningStream(cfg, word_tokenizer, mixture=mix, pool=16)
    for _ in range(30):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # what a checkpoint stores
    expected = [run.next_batch() for _ in range(40)]
    assert run.examples.epoch >= 1
    resumed = TuningStream(cfg, word_tokenizer, mixture=mix, pool=16)
    resumed.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(expected, (resumed.next_batch() for _ in range(40))))
    fresh = TuningStream(cfg, word_tokenizer, mixture=mix, pool=16)
    assert not _same(fresh.next_batch(), expected[0])
    with pytest.raises(ValueError, match="resume with the same --train.seed"):
        TuningStream(cfg, word_tokenizer, mixture=_mixture(shared_data, cap=8, seed=5)).load_state_dict(state)


def test_tuning_batches_follow_the_contract(shared_data, word_tokenizer):
    stream = TuningStream(_cfg(batch_size=8), word_tokenizer, mixture=_mixture(shared_data, cap=20))
    batch = stream.next_batch()
    assert batch.tokens.shape == (8, 64) and batch.num_target_tokens() > 0
    for _ in range(20):
        stream.next_batch()
    assert stream.efficiency > 0.9


def test_validation_batches_are_fixed(shared_data, word_tokenizer):
    stream = TuningStream(_cfg(), word_tokenizer, mixture=_mixture(shared_data, cap=8))
    first, second = stream.val_batches(2), stream.val_batches(2)
    assert len(first) == 2 and all(_same(a, b) for a, b in zip(first, second))


def test_streaming_mixer_equals_the_in_memory_one_on_the_samples(shared_data):
    """Same examples in the same order, rendered the same, whether rows are read by byte offset or in memory."""
    from flan.loaders import RowIndex

    reg = load_registry()
    kwargs = dict(heldout="nli", split="train", data_dir=shared_data, cap=300, seed=7)
    streamed = Mixture.build(reg, **kwargs)
    in_memory = Mixture.build(reg, stream=False, **kwargs)
    assert any(isinstance(r, RowIndex) for r in streamed.rows.values())
    assert streamed.sizes == in_memory.sizes
    a, b = ExampleStream(streamed).take(4000), ExampleStream(in_memory).take(4000)
    assert a == b
    assert [streamed.render(k) for k in a[::7]] == [in_memory.render(k) for k in b[::7]]
