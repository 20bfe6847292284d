"""Templates as data: all of them render on real rows, OPTIONS and turned-around rules, clear errors."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from flan.loaders import SPLITS, has_split, load_split
from flan.registry import load_registry
from flan.templates import TemplateError, load_templates, parse_templates, render, render_template

REG = load_registry()
ROWS_PER_SPLIT = 25


def _real_rows(spec, data_dir):
    for split in SPLITS:
        if has_split(spec, split, data_dir):
            yield from load_split(spec, split, data_dir=data_dir).rows[:ROWS_PER_SPLIT]


def _check(spec, template, ex, row):
    assert ex.prompt.strip()
    if template.has_options:
        assert ex.options is not None and ex.target in ex.options
        assert "OPTIONS:\n- " in ex.prompt
    else:
        assert ex.options is None
    if spec.kind == "gen" and not template.turned_around and all(row.get(s) for s in template.slots):
        assert ex.target.strip()


@pytest.mark.parametrize("name", sorted(REG.tasks))
def test_every_template_renders(name, shared_data):
    """Real rows where the dataset has local data, a row built from the registry fields otherwise."""
    spec = REG.get(name)
    templates = load_templates(spec)
    rows = list(_real_rows(spec, shared_data))
    if not rows:
        rows = [_synthetic_row(spec)]
    for row in rows:
        for t in templates:
            _check(spec, t, render_template(spec, t, row), row)


def _synthetic_row(spec):
    row = {}
    for name, f in spec.fields.items():
        row[name] = {"text": f"<{name}>", "int": 0, "float": 1.0, "list": [f"<{name} a>", f"<{name} b>"],
                     "triples": [["s", "p", "o"]], "numbered": ["first", "second"]}[f.type]
    if spec.labels:
        row[spec.labels.field] = 1.0 if spec.labels.round else spec.labels.values[-1]
    return row


@pytest.mark.parametrize("name", sorted(REG.tasks))
def test_ten_templates_with_at_most_three_turned_around(name):
    templates = load_templates(REG.get(name))
    assert len(templates) == 10
    assert sum(t.turned_around for t in templates) <= 3
    assert len({t.input for t in templates}) == 10, "no two templates share an input pattern"


RTE_ROW = {"premise": "It rained all day.", "hypothesis": "The ground is dry.", "label": "not_entailment",
           "label_idx": 1, "idx": 0}


def test_options_suffix_is_built_from_the_label_set():
    ex = render("rte", RTE_ROW, 0)
    assert ex.prompt.endswith("\n\nOPTIONS:\n- yes\n- no")
    assert ex.target == "no" and ex.options == ("yes", "no")
    cb = render("cb", {**RTE_ROW, "label": "neutral"}, 0)
    assert cb.prompt.endswith("OPTIONS:\n- Yes\n- No\n- It's impossible to say")
    assert cb.target == "It's impossible to say"


def test_options_placed_by_the_template_are_not_repeated(shared_data):
    spec = REG.get("arc_easy")
    t = next(t for t in load_templates(spec) if "options_" in t.slots and t.has_options)
    row = json.loads((shared_data / "arc_easy" / "train.jsonl").open().readline())
    ex = render_template(spec, t, row)
    assert ex.prompt.count("OPTIONS:") == 1 and not ex.prompt.endswith("\n\nOPTIONS:\n- " + row["options"][-1])
    assert ex.target == row["answer"] and list(ex.options) == row["options"]


def test_turned_around_templates_invert_the_task():
    spec = REG.get("rte")
    turned = [t for t in load_templates(spec) if t.turned_around]
    assert turned
    for t in turned:
        ex = render_template(spec, t, RTE_ROW)
        assert ex.options is None and "OPTIONS" not in ex.prompt
        assert ex.target in (RTE_ROW["hypothesis"], RTE_ROW["premise"])
        assert '"no"' in ex.prompt  # the answer is given, the text is asked for


def test_row_values_are_never_formatted(shared_data):
    """Braces inside data stay literal: rendering is substitution, not str.format on the result."""
    row = {**RTE_ROW, "premise": "{hypothesis} {0} {__class__}"}
    assert render("rte", row, 0).prompt.startswith("Suppose the following is true: {hypothesis} {0} {__class__}")


@settings(max_examples=30, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_any_field_text_renders_verbatim(premise, hypothesis):
    ex = render("rte", {**RTE_ROW, "premise": premise, "hypothesis": hypothesis}, 1)
    assert ex.prompt == f"Premise: {premise}\nHypothesis: {hypothesis}\n\nDoes the premise entail the hypothesis?" \
                        "\n\nOPTIONS:\n- yes\n- no"


def _write(tmp_path, body):
    path = tmp_path / "rte.toml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("input_, target, message", [
    ("{premise} {nope}", "{answer_}", r"template 0: unknown slot \{nope\} for dataset rte"),
    ("{premise.upper}", "{answer_}", r"slot \{premise.upper\} is not allowed"),
    ("{premise[0]}", "{answer_}", r"slot \{premise\[0\]\} is not allowed"),
    ("{premise!r}", "{answer_}", r"slot \{premise!r\} is not allowed"),
    ("{premise:>30}", "{answer_}", r"slot \{premise:>30\} is not allowed"),
    ("{premise", "{answer_}", "unbalanced braces"),
    ("{premise}", "{hypothesis}", r"must target exactly \{answer_\}"),
    ("{premise} {label}", "{answer_}", r"shows the answer through \{label\}"),
])
def test_bad_templates_fail_on_load_naming_file_template_and_slot(tmp_path, input_, target, message):
    path = _write(tmp_path, f'[[template]]\ninput = "{input_}"\ntarget = "{target}"\n')
    with pytest.raises(TemplateError, match=message) as err:
        parse_templates(REG.get("rte"), path)
    assert str(path) in str(err.value)


def test_bad_template_is_named_by_its_index(tmp_path):
    good = '[[template]]\ninput = "{premise}"\ntarget = "{answer_}"\n'
    path = _write(tmp_path, good + '[[template]]\ninput = "{premise}"\ntarget = "{answer_}"\nextra = 1\n')
    with pytest.raises(TemplateError, match="template 1: unknown keys"):
        parse_templates(REG.get("rte"), path)


def test_missing_templates_file_says_how_to_add_one(tmp_path):
    with pytest.raises(TemplateError, match="no templates file for dataset rte"):
        load_templates(REG.get("rte"), tmp_path)
