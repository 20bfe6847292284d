"""Loaders: every local split validates; malformed rows give file:line errors or are skipped and counted."""
import json

import pytest

from flan.loaders import SPLITS, DataError, count_examples, has_split, load_split, row_problem
from flan.registry import load_registry

REG = load_registry()


def test_every_local_split_loads_cleanly(shared_data):
    loaded = 0
    for spec in REG.tasks.values():
        for split in SPLITS:
            if has_split(spec, split, shared_data):
                got = load_split(spec, split, data_dir=shared_data)
                assert not got.skipped
                assert len(got.rows) == count_examples(spec, split, shared_data) > 0
                loaded += 1
    assert loaded >= 60


GOOD = {"premise": "p", "hypothesis": "h", "label": "entailment", "label_idx": 0, "idx": 0}


def _dataset(tmp_path, lines):
    folder = tmp_path / "rte"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


BAD_ROWS = [
    ({k: v for k, v in GOOD.items() if k != "hypothesis"}, "missing field 'hypothesis'"),
    ({**GOOD, "label": "maybe"}, "label 'maybe' in field 'label' is not one of entailment, not_entailment"),
    ({**GOOD, "idx": "7"}, "field 'idx' should be int, got str"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS)
def test_malformed_row_errors_name_file_and_line(tmp_path, row, message):
    path = _dataset(tmp_path, [json.dumps(GOOD), json.dumps(row)])
    with pytest.raises(DataError) as err:
        load_split(REG.get("rte"), "train", data_dir=tmp_path)
    assert f"{path}:2: {message}" in str(err.value)
    assert "--data.bad_rows=skip" in str(err.value)


def test_invalid_json_is_reported_with_its_line(tmp_path):
    path = _dataset(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), '{"premise": "p",'])
    with pytest.raises(DataError, match=f"{path}:3: not valid JSON"):
        load_split(REG.get("rte"), "train", data_dir=tmp_path)


def test_skip_mode_keeps_good_rows_and_counts_bad_ones(tmp_path):
    lines = [json.dumps(GOOD)] + [json.dumps(r) for r, _ in BAD_ROWS] + ["not json", json.dumps(GOOD)]
    path = _dataset(tmp_path, lines)
    got = load_split(REG.get("rte"), "train", data_dir=tmp_path, bad_rows="skip")
    assert len(got.rows) == 2
    assert [s.split(": ", 1)[0] for s in got.skipped] == [f"{path}:{i}" for i in (2, 3, 4, 5)]


def test_multiple_choice_gold_must_be_an_option():
    spec = REG.get("copa")
    row = {"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": 2, "answer": "a"}
    assert "gold choice 2 (field 'label') is not among the 2 options" in row_problem(spec, row)
    assert row_problem(spec, {**row, "label": 1}) is None
    record = REG.get("record")
    rec = {"source": "s", "passage": "p", "query": "q @placeholder", "entities": ["A", "B"], "answers": ["C"], "idx": 0}
    assert "is not among the 2 options" in row_problem(record, rec)
    assert row_problem(record, {**rec, "answers": ["B"]}) is None


def test_a_missing_split_says_what_to_do(shared_data):
    with pytest.raises(DataError, match="dataset squad has no train split here; `flan data tasks`"):
        load_split(REG.get("squad"), "train", data_dir=shared_data)


@pytest.mark.parametrize("reader", ["load_split", "open_split"])
def test_empty_splits_are_reported_by_dataset(tmp_path, reader):
    from flan.loaders import open_split

    read = {"load_split": lambda *a, **k: load_split(*a, **k).rows,
            "open_split": lambda *a, **k: open_split(*a, **k)[0]}
    folder = tmp_path / "rte"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n")
    (folder / "validation.jsonl").write_text("")
    with pytest.warns(UserWarning, match=f"{folder / 'train.jsonl'}: dataset rte has an empty train split"):
        assert len(read[reader](REG.get("rte"), "train", data_dir=tmp_path)) == 0
    with pytest.raises(DataError, match=f"{folder / 'validation.jsonl'}: dataset rte has an empty validation split"):
        read[reader](REG.get("rte"), "validation", data_dir=tmp_path)
    (folder / "validation.jsonl").write_bytes(b'{"premise": "p\xff"}\n')
    with pytest.raises(DataError, match="all 1 rows were malformed and skipped"):
        read[reader](REG.get("rte"), "validation", data_dir=tmp_path, bad_rows="skip")
