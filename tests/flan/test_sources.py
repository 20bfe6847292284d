"""The [source] table of every task file: where the public data lives and how hub rows map onto the task."""
import shutil

import pytest

from flan.loaders import row_problem
from flan.registry import RegistryError, load_registry, scan_registry
from flan.sources import MapError, map_row


def test_every_task_file_names_its_source():
    for spec in load_registry().tasks.values():
        src = spec.origin
        assert src.hub or src.no_hub, spec.name
        if src.preparable:
            assert src.splits and src.tfds, spec.name
        else:
            assert len(src.no_hub) > 20, f"{spec.name}: say why there is no usable hub copy"


def test_derived_tasks_say_they_have_no_hub_copy():
    reg = load_registry()
    for spec in reg.tasks.values():
        if spec.derived:
            assert not spec.origin.preparable


@pytest.mark.parametrize("name, hub_row", [
    ("cb", {"premise": "p", "hypothesis": "h", "label": 2, "idx": 7}),
    ("bool_q", {"question": "q", "passage": "p", "answer": True}),
    ("arc_easy", {"question": "q", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "C"}),
    ("hellaswag", {"ctx": "c", "endings": ["x", "y", "z", "w"], "label": "1"}),
    ("trec", {"text": "t", "coarse_label": 2, "fine_label": 26}),
    ("squad", {"title": "T", "context": "c", "question": "q", "answers": {"text": ["a1", "a2"], "answer_start": [0, 1]}}),
    ("winogrande", {"sentence": "s _", "option1": "a", "option2": "b", "answer": "2"}),
    ("wmt16_translate_deen", {"translation": {"en": "hi", "de": "hallo"}}),
])
def test_hub_rows_map_onto_valid_task_rows(name, hub_row):
    spec = load_registry().get(name)
    row = map_row(spec, hub_row)
    assert row_problem(spec, row) is None, row


def test_mapped_values():
    reg = load_registry()
    assert map_row(reg.get("cb"), {"premise": "p", "hypothesis": "h", "label": 2, "idx": 7})["label"] == "neutral"
    arc = map_row(reg.get("arc_easy"), {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                                         "answerKey": "B"})
    assert (arc["label"], arc["answer"], arc["options"]) == (1, "b", ["a", "b"])
    trec = map_row(reg.get("trec"), {"text": "t", "coarse_label": 2, "fine_label": 26})
    assert (trec["label"], trec["label_coarse"], trec["label_fine"], trec["label_idx"]) == \
        ("description", "DESC", "DESC:manner", 0)


def test_unmapped_hub_values_and_missing_columns_say_what():
    spec = load_registry().get("cb")
    with pytest.raises(MapError, match=r"hub value 5 of column 'label' has no entry"):
        map_row(spec, {"premise": "p", "hypothesis": "h", "label": 5, "idx": 0})
    with pytest.raises(MapError, match=r"hub column 'premise' is missing"):
        map_row(spec, {"hypothesis": "h", "label": 0, "idx": 0})


@pytest.fixture
def task_dir(tmp_path):
    src = load_registry().folder
    for name in ("_clusters.toml", "rte.toml"):
        shutil.copy(src / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("old, new, message", [
    ("[source]\n", "[nosource]\n", r"unknown keys \['nosource'\]"),
    ('hub = "super_glue"\n', "", r"needs hub = .* or no_hub"),
    ('hypothesis = "hypothesis"\nlabel = "label"', 'label = "label"', r"'hypothesis' is filled by neither"),
    ('idx = "idx"\n', 'idx = "idx"\nbogus = "x"\n', r"fills 'bogus', which is not in \[fields\]"),
    ('splits = { train', 'splits = { dev', r"splits.dev: keys are train, validation, test"),
])
def test_malformed_source_tables_name_file_and_key(task_dir, old, new, message):
    path = task_dir / "rte.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    with pytest.raises(RegistryError, match=message) as err:
        scan_registry(task_dir)
    assert "rte.toml" in str(err.value)
