"""Issue 20 item 6: data errors name their file and line. A truncated JSON row or a non-UTF-8 byte in any file a
command reads (dataset rows, the corpus, the tokenizer's sources) stops it with one line naming file and line,
or is skipped and counted with --data.bad_rows=skip; an empty validation file is an error naming the dataset,
an empty train file a warning naming it. Each case runs on a copy of a few shared datasets."""
import json
import shutil
from pathlib import Path

import pytest

from engine.config import load_config
from engine.tokenizer import cached_model_path, train_tokenizer
from tests.reliability.harness import SMALL, flan, one_error_line, pretrain, snapshot

DATASETS = ("cb", "copa", "corpus")
VOCAB = ["--model.vocab_size=512", "--data.tokenizer_sentences=5000"]
"""A small tokenizer: trained in about a second on the copy."""


def copy_data(shared: Path, dest: Path) -> Path:
    for name in DATASETS:
        shutil.copytree(shared / name, dest / name)
    for path in dest.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # the shared files are read-only
    return dest


@pytest.fixture(scope="module")
def tokenizer(shared_data, tmp_path_factory) -> Path:
    """A tokenizer trained on a clean copy, for the commands whose dataset readers are under test."""
    data = copy_data(shared_data, tmp_path_factory.mktemp("clean"))
    cache = tmp_path_factory.mktemp("tok-cache")
    return train_tokenizer(load_config("configs/tiny.toml", [f"--data.data_dir={data}", *VOCAB,
                                                             f"--data.tokenizer_cache={cache}"]))


@pytest.fixture
def data(shared_data, tmp_path) -> Path:
    return copy_data(shared_data, tmp_path / "data")


def damage(path: Path, line: int, how: str) -> None:
    """Line `line` (1-based) cut short mid-row ("truncate") or with a 0xff byte at its 5th column ("byte")."""
    lines = path.read_bytes().split(b"\n")
    row = lines[line - 1]
    lines[line - 1] = row[: len(row) // 2] if how == "truncate" else row[:4] + b"\xff" + row[5:]
    path.write_bytes(b"\n".join(lines))


def with_data(data: Path, tokenizer: Path | None = None) -> list[str]:
    tok = [f"--data.tokenizer={tokenizer}"] if tokenizer else [f"--data.tokenizer_cache={data.parent / 'tok'}"]
    return [f"--data.data_dir={data}", *VOCAB, *tok]


def test_a_truncated_row_stops_pretraining_with_its_file_and_line(data, tmp_path):
    damage(data / "copa" / "train.jsonl", 5, "truncate")
    before = snapshot(data)
    rc, _, err = pretrain(tmp_path / "run", "--train.steps=1", *with_data(data))
    assert rc == 1
    one_error_line(err, f"{data / 'copa' / 'train.jsonl'}:5:", "not valid JSON", "--data.bad_rows=skip")
    assert snapshot(data) == before


def test_skip_leaves_the_row_out_and_counts_it(data):
    damage(data / "copa" / "train.jsonl", 5, "truncate")
    rc, out, err = flan("tokenizer", "train", "configs/tiny.toml", *with_data(data), "--data.bad_rows=skip")
    assert rc == 0 and out.strip().endswith("(512 pieces)")
    warning = next(line for line in err.splitlines() if "skipped 1 malformed rows" in line)
    assert warning.startswith("flan tokenizer: warning: ") and f"{data / 'copa' / 'train.jsonl'}:5:" in warning


@pytest.mark.parametrize("command, file, line", [
    (["data", "preview", "copa"], "copa/train.jsonl", 3),
    (["data", "mix", "configs/tiny.toml"], "copa/train.jsonl", 7),
    (["tune", "configs/tiny.toml", *SMALL, "--train.steps=1"], "copa/train.jsonl", 7),
    (["tokenizer", "train", "configs/tiny.toml"], "cb/train.jsonl", 2),
    (["pretrain", "configs/tiny.toml", *SMALL, "--train.steps=1"], "corpus/train.txt", 9),
])
def test_a_non_utf8_byte_names_file_and_line(command, file, line, data, tokenizer, tmp_path):
    damage(data / file, line, "byte")
    uses_tokenizer = command[0] != "tokenizer"
    rc, _, err = flan(*command, *with_data(data, tokenizer if uses_tokenizer else None),
                      f"--train.run_dir={tmp_path / 'run'}")
    assert rc == 1
    one_error_line(err, f"{data / file}:{line}:", "not UTF-8 (byte 0xff at column 5)")


def test_eval_names_a_bad_validation_row_and_an_empty_validation_file(data, trained_run, tmp_path):
    tokenizer = cached_model_path(load_config("configs/tiny.toml"))  # the one trained_run was made with
    before = snapshot(trained_run)
    eval_cb = ["eval", "configs/tiny.toml", "--checkpoint", str(trained_run), "--datasets", "cb", "--limit", "4",
               "--out", str(tmp_path / "eval"), f"--data.data_dir={data}", f"--data.tokenizer={tokenizer}"]
    validation = data / "cb" / "validation.jsonl"
    damage(validation, 4, "byte")
    rc, _, err = flan(*eval_cb)
    assert rc == 1
    one_error_line(err, f"{validation}:4:", "not UTF-8")
    validation.write_bytes(b"")
    rc, _, err = flan(*eval_cb)
    assert rc == 1
    one_error_line(err, str(validation), "dataset cb has an empty validation split")
    assert snapshot(trained_run) == before and not (tmp_path / "eval" / "scores.json").exists()


def test_an_empty_train_file_is_a_warning_naming_the_dataset(data, tokenizer):
    (data / "copa" / "train.jsonl").write_bytes(b"\n")
    rc, out, err = flan("data", "mix", "configs/tiny.toml", *with_data(data, tokenizer))
    assert rc == 0, err
    assert f"flan data: warning: {data / 'copa' / 'train.jsonl'}: dataset copa has an empty train split" in err
    left_out = next(line for line in out.splitlines() if line.startswith("eligible but without local train data"))
    assert "copa" in left_out.split(": ", 1)[1].split(", ")


def test_prepare_names_a_bad_line_of_a_local_copy_and_skip_counts_it(data, tmp_path):
    """A hub-layout JSON Lines copy of CB with one truncated row: `datasets` would fail on the whole file."""
    copy = tmp_path / "hub" / "super_glue" / "cb"
    copy.mkdir(parents=True)
    rows = [json.loads(line) for line in (data / "cb" / "train.jsonl").read_text().splitlines()[:6]]
    lines = [json.dumps({"premise": r["premise"], "hypothesis": r["hypothesis"], "idx": i,
                         "label": ["entailment", "contradiction", "neutral"].index(r["label"])})
             for i, r in enumerate(rows)]
    lines[3] = lines[3][:25]
    (copy / "train.jsonl").write_text("\n".join(lines) + "\n")
    (copy / "validation.jsonl").write_text("\n".join(lines[:3]) + "\n")
    prepare = ["data", "prepare", "cb", "--from", str(tmp_path / "hub"), "--out", str(tmp_path / "out")]
    rc, _, err = flan(*prepare)
    assert rc == 1
    one_error_line(err, f"{copy / 'train.jsonl'}:4:", "not valid JSON", "--data.bad_rows=skip")
    assert not (tmp_path / "out" / "cb" / "train.jsonl").exists()
    rc, out, err = flan(*prepare, "--data.bad_rows=skip")
    assert rc == 0, err
    assert "train 5 (+1 bad rows skipped), validation 3" in out
