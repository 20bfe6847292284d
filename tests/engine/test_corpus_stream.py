"""The streamed pretraining corpus (data.corpus): data-parallel ranks read disjoint shards whose rows together
are the single-rank stream's; a resumed stream continues exactly (in process, and under torchrun dp=2 against an
uninterrupted run); text, JSONL and parquet files of the same records give the same stream; bad rows are named
by file and line even deep inside a shard."""
import json
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine.config import load_config
from engine.corpus_stream import StreamingCorpus, corpus_shards
from engine.data_files import DataError
from engine.tokenizer import load_tokenizer

LINES = 1200
"""Lines of the shared corpus the tests stream: about 150 kB, tokenized in well under a second."""


@pytest.fixture(scope="module")
def tok(shared_data):
    return load_tokenizer(load_config("configs/tiny.toml"))


@pytest.fixture(scope="module")
def lines(shared_data) -> list[str]:
    text = (shared_data / "corpus" / "train.txt").read_text(encoding="utf-8").splitlines()[:LINES]
    return [line.strip() for line in text if line.strip()]


@pytest.fixture
def corpus_txt(lines, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def config(corpus, *flags):
    return load_config("configs/tiny.toml", [f"--data.corpus={corpus}", "--data.seq_len=16", *flags])


def epoch_rows(stream: StreamingCorpus) -> Counter:
    """Every row one rank reads in its first epoch (one row per batch)."""
    rows = Counter()
    while stream.epoch == 0:
        rows[tuple(stream.next_batch().tokens[0].tolist())] += 1
    return rows


@pytest.mark.parametrize("dp", [2, 3])
def test_ranks_read_disjoint_shards_whose_rows_are_the_single_rank_stream(dp, tok, corpus_txt):
    one = StreamingCorpus(config(corpus_txt, "--train.batch_size=1", "--data.corpus_shard_mb=0.01"), tok, 0, 1)
    assert len(one.shards) >= 2 * dp
    reference = epoch_rows(one)
    cfg = config(corpus_txt, f"--train.batch_size={dp}", "--data.corpus_shard_mb=0.01")
    ranks = [StreamingCorpus(cfg, tok, r, dp) for r in range(dp)]
    seen = [epoch_rows(s) for s in ranks]
    assert all(seen) and sum(seen, Counter()) == reference
    shards = [set(s._my_shards(0)) for s in ranks]
    assert all(not (a & b) for i, a in enumerate(shards) for b in shards[i + 1:])


def test_a_resumed_stream_continues_exactly(tok, lines, tmp_path):
    small = tmp_path / "small.txt"  # fewer rows than the 240 read, in several shards
    small.write_text("\n".join(lines[:20]), encoding="utf-8")
    cfg = config(small, "--train.batch_size=8", "--data.corpus_shard_mb=0.002")
    whole = StreamingCorpus(cfg, tok, 0, 1)
    want = [whole.next_batch().tokens for _ in range(30)]  # crosses shards and an epoch
    assert whole.epoch >= 1 and len(whole.shards) >= 3
    first = StreamingCorpus(cfg, tok, 0, 1)
    got = [first.next_batch().tokens for _ in range(13)]
    resumed = StreamingCorpus(cfg, tok, 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [resumed.next_batch().tokens for _ in range(17)]
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got) == len(want)


def test_a_resume_under_another_dp_or_corpus_is_refused(tok, corpus_txt):
    cfg = config(corpus_txt, "--train.batch_size=2", "--data.corpus_shard_mb=0.01")
    state = StreamingCorpus(cfg, tok, 0, 1).state_dict()
    with pytest.raises(DataError, match="saved for parallel.dp=1 over .* this run has dp=2"):
        StreamingCorpus(cfg, tok, 1, 2).load_state_dict(state)
    with pytest.raises(DataError, match="in-memory corpus"):
        StreamingCorpus(cfg, tok, 0, 1).load_state_dict({"position": 8})


def test_text_jsonl_and_parquet_of_the_same_records_give_the_same_stream(tok, lines, tmp_path):
    parts = [lines[i::3] for i in range(3)]
    for i, part in enumerate(parts):
        (tmp_path / "txt").mkdir(exist_ok=True)
        (tmp_path / "txt" / f"{i}.txt").write_text("\n".join(part) + "\n", encoding="utf-8")
        (tmp_path / "jsonl").mkdir(exist_ok=True)
        (tmp_path / "jsonl" / f"{i}.jsonl").write_text(
            "".join(json.dumps({"id": k, "text": t}) + "\n" for k, t in enumerate(part)), encoding="utf-8")
        (tmp_path / "parquet").mkdir(exist_ok=True)
        pq.write_table(pa.table({"text": part, "id": list(range(len(part)))}), tmp_path / "parquet" / f"{i}.parquet")
    streams = {kind: StreamingCorpus(config(tmp_path / kind / f"*.{kind}", "--train.batch_size=4",
                                            "--data.corpus_shard_mb=100",
                                            f"--data.corpus_valid={tmp_path / kind / f'2.{kind}'}"), tok, 0, 1)
               for kind in ("txt", "jsonl", "parquet")}
    batches = {kind: [s.next_batch().tokens for _ in range(40)] + [b.tokens for b in s.val_batches(3)]
               for kind, s in streams.items()}
    assert len(batches["txt"]) == 43
    for kind in ("jsonl", "parquet"):
        assert all(torch.equal(a, b) for a, b in zip(batches[kind], batches["txt"], strict=True)), kind


def test_a_bad_row_deep_in_a_shard_is_named_by_its_line(tok, lines, tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [json.dumps({"text": t}) for t in lines]
    rows[700] = rows[700][:10]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = config(path, "--train.batch_size=8", "--data.corpus_shard_mb=0.01")
    assert len(corpus_shards(str(path), 0.01)) > 5
    stream = StreamingCorpus(cfg, tok, 0, 1)
    with pytest.raises(DataError, match=f"{path}:701: not valid JSON"):
        for _ in range(1000):
            stream.next_batch()
    skipping = StreamingCorpus(config(path, "--train.batch_size=8", "--data.corpus_shard_mb=0.01",
                                      "--data.bad_rows=skip"), tok, 0, 1)
    with pytest.warns(UserWarning, match=f"skipped 1 malformed rows.*{path}:701:"):
        while skipping.epoch == 0:
            skipping.next_batch()
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match="no `text` column"):
        StreamingCorpus(config(tmp_path / "p.parquet"), tok, 0, 1).next_batch()
    with pytest.raises(DataError, match="no file matches"):
        StreamingCorpus(config(tmp_path / "none*.txt"), tok, 0, 1)


def test_torchrun_dp2_resume_equals_the_uninterrupted_run(tok, corpus_txt, tmp_path):
    from tests.reliability.harness import SMALL, torchrun

    def run(folder, *flags):
        rc, _, err = torchrun(2, "pretrain", "configs/tiny.toml", *SMALL, f"--train.run_dir={folder}",
                              f"--data.tokenizer={tok.path}", f"--data.corpus={corpus_txt}",
                              "--data.corpus_shard_mb=0.01", "--train.steps=4", *flags)
        assert rc == 0, err
        return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]

    whole = run(tmp_path / "whole", "--train.ckpt_every=2")
    state = json.loads((tmp_path / "whole" / "checkpoints" / "step-000002" / "index.json").read_text())["data"]
    assert state["dp"] == 2 and len(state["positions"]) == 2
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    assert run(tmp_path / "resumed", "--train.resume_from=step-2") == whole
