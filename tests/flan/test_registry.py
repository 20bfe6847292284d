"""The task registry: 64 entries for the paper's 62 datasets in 12 clusters, scanned from flan/tasks/."""
import shutil

import pytest

from flan.loaders import count_examples
from flan.registry import TASKS_DIR, RegistryError, load_registry, scan_registry

REG = load_registry()


def test_counts_match_the_paper():
    assert len(REG.tasks) == 64
    assert len({t.paper_dataset for t in REG.tasks.values()}) == 62
    assert len(REG.clusters) == 12
    assert all(REG.in_cluster(c) for c in REG.clusters), "every cluster has datasets"
    assert len(REG.in_cluster("summarization")) == 11 and len(REG.in_cluster("translation")) == 8


def test_label_strings_follow_flan():
    assert REG.get("cb").labels.options == ("Yes", "No", "It's impossible to say")
    assert REG.get("rte").labels.values == ("entailment", "not_entailment")
    assert REG.get("wic").labels.options == ("different meanings", "the same meaning")
    assert REG.get("copa").choices.option_fields == ("choice1", "choice2")
    assert REG.get("stsb").labels.round


def test_datasets_without_local_data_are_registered_and_say_so(shared_data):
    for name in ("anli", "squad", "xsum", "wmt14_enfr"):
        spec = REG.get(name)
        assert count_examples(spec, "train", shared_data) == 0
        assert "No local data" in spec.notes
    assert count_examples(REG.get("rte"), "train", shared_data) == 2000
    assert count_examples(REG.get("math_dataset"), "train", shared_data) == 2000  # derived


@pytest.mark.parametrize("heldout, excluded", [
    ("nli", {"nli", "paraphrase"}),
    ("paraphrase", {"paraphrase", "nli"}),
    ("reading_comprehension", {"reading_comprehension", "read_comp_with_commonsense"}),
    ("commonsense", {"commonsense", "read_comp_with_commonsense"}),
    ("read_comp_with_commonsense", {"read_comp_with_commonsense", "reading_comprehension", "commonsense"}),
    ("translation", {"translation"}),
])
def test_leave_one_cluster_out_with_flan_exclusions(heldout, excluded):
    train = REG.training_tasks(heldout)
    assert {t.cluster for t in train} == set(REG.clusters) - excluded
    assert len(train) == sum(1 for t in REG.tasks.values() if t.cluster not in excluded)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(RegistryError, match="unknown dataset 'nope'; known datasets: aeslc, ag_news_subset"):
        REG.get("nope")
    with pytest.raises(RegistryError, match="known clusters: nli"):
        REG.training_tasks("logic")


@pytest.fixture
def task_dir(tmp_path):
    for name in ("_clusters.toml", "rte.toml", "copa.toml"):
        shutil.copy(TASKS_DIR / name, tmp_path / name)
    return tmp_path


def test_scanning_finds_a_new_task_file(task_dir):
    text = (task_dir / "rte.toml").read_text().replace('name = "rte"', 'name = "rte_copy"')
    (task_dir / "new.toml").write_text(text)
    assert sorted(scan_registry(task_dir).tasks) == ["copa", "rte", "rte_copy"]


def test_duplicate_names_name_both_files(task_dir):
    shutil.copy(task_dir / "rte.toml", task_dir / "rte_again.toml")
    with pytest.raises(RegistryError, match=r"'rte' is defined twice: .*rte.toml and .*rte_again.toml"):
        scan_registry(task_dir)


@pytest.mark.parametrize("old, new, message", [
    ('premise = "text"', 'premise = "string"', r"\[fields\] premise = 'string': accepted types are"),
    ('cluster = "nli"', 'cluster = "logic"', "cluster = 'logic' is unknown"),
    ('kind = "cls"', 'kind = "regression"', "kind = 'regression'; accepted: cls, mc, gen"),
    ('field = "label"', 'field = "gold"', r"\[labels\] field = 'gold' is not in \[fields\]"),
    ('metric = "accuracy"', 'metric = "vibes"', "metric = 'vibes'"),
    ('options = ["yes", "no"]', 'options = ["yes"]', r"\[labels\] values and options must be lists of equal length"),
])
def test_malformed_task_files_name_file_and_key(task_dir, old, new, message):
    path = task_dir / "rte.toml"
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(RegistryError, match=message) as err:
        scan_registry(task_dir)
    assert "rte.toml" in str(err.value)
