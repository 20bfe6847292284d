"""Tokenizer: trained on the shared corpus, cached by content hash, lossless round trip; both backends
(SentencePiece BPE, `tokenizers` tokenizer.json) give transformers' ids, BOS included where the model adds it."""
import pytest
from hf_folders import built, probe_texts

from engine.config import load_config
from engine.tokenizer import Tokenizer, cached_model_path, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(shared_data):
    return load_tokenizer(load_config("configs/tiny.toml"))


def test_round_trip_on_corpus_and_dataset_text(tok, shared_data):
    lines = (shared_data / "corpus" / "valid.txt").read_text().splitlines()[:200]
    for text in [l.strip() for l in lines if l.strip()] + ["Solve 12*p = -9*p + 21 for p.", "naïve café — 東京"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 4096 and len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3


def test_cache_is_reused_and_keyed_by_settings(tok):
    cfg = load_config("configs/tiny.toml")
    assert train_tokenizer(cfg) == tok.path
    other = load_config("configs/tiny.toml", ["--model.vocab_size=2048"])
    assert cached_model_path(other) != tok.path


def test_named_model_file_is_used_and_checked(tok, tmp_path):
    cfg = load_config("configs/tiny.toml", [f"--data.tokenizer={tok.path}"])
    assert load_tokenizer(cfg).path == tok.path
    bad = load_config("configs/tiny.toml", [f"--data.tokenizer={tok.path}", "--model.vocab_size=1000"])
    with pytest.raises(ValueError, match="tokenizer has 4096 pieces but model.vocab_size=1000"):
        load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "missing.model")


@pytest.mark.parametrize("kind, file, backend", [("llama2", "tokenizer.model", "sentencepiece-bpe"),
                                                  ("llama2", "tokenizer.json", "tokenizers"),
                                                  ("llama3", "tokenizer.json", "tokenizers")])
def test_both_backends_give_transformers_ids(kind, file, backend, tmp_path_factory, shared_data):
    transformers = pytest.importorskip("transformers")
    folder = built(kind, tmp_path_factory, shared_data / "corpus")
    ours, theirs = Tokenizer.load(folder / file), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.kind == backend and ours.vocab_size == len(theirs) and ours.add_bos
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    for text in probe_texts(shared_data):
        if file == "tokenizer.model" and text.startswith(" "):
            continue  # where transformers 5 and SentencePiece differ (test_hf_tokenizer_check)
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.bos_prefix + ours.encode(text) == theirs.encode(text), text
    assert ours.decode(ours.encode("Hello world, 12 apples.")) == "Hello world, 12 apples."


def test_trained_tokenizer_adds_no_bos(tok):
    assert tok.kind == "sentencepiece-unigram" and tok.bos_prefix == []


def test_the_tokenizer_samples_a_streamed_corpus(shared_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.data_files import DataError
    from engine.tokenizer import training_lines

    lines = [l.strip() for l in (shared_data / "corpus" / "valid.txt").read_text().splitlines()[:400] if l.strip()]
    for i in range(2):
        pq.write_table(pa.table({"text": lines[i::2]}), tmp_path / f"part-{i}.parquet", row_group_size=20)
    flags = [f"--data.corpus={tmp_path}/part-*.parquet", f"--data.data_dir={tmp_path}", "--model.vocab_size=512",
             f"--data.tokenizer_cache={tmp_path / 'cache'}"]
    everything = training_lines(load_config("configs/tiny.toml", flags))
    assert sorted(everything) == sorted(lines)  # no dataset train.jsonl under data_dir: the corpus alone
    sample = training_lines(load_config("configs/tiny.toml", [*flags, "--data.tokenizer_sentences=30"]))
    assert len(sample) == 30 and set(sample) <= set(lines) and sample != lines[:30]  # a seeded shard order
    cfg = load_config("configs/tiny.toml", flags)
    trained = load_tokenizer(cfg)
    assert trained.vocab_size == 512 and trained.decode(trained.encode(lines[3])) == lines[3]
    one_file = load_config("configs/tiny.toml", [f"--data.corpus={tmp_path}/part-0.parquet", *flags[1:]])
    assert cached_model_path(cfg) != cached_model_path(one_file)
    (tmp_path / "part-9.jsonl").write_text('{"text": "fine"}\n{"text": 7}\n')
    bad = [f"--data.corpus={tmp_path}/part-*", *flags[1:]]
    with pytest.raises(DataError, match=f"{tmp_path / 'part-9.jsonl'}:2: `text` is int"):
        training_lines(load_config("configs/tiny.toml", bad))
