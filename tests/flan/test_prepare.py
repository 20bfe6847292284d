"""`flan data prepare` on fixtures made here with `datasets`: a hub-layout parquet copy (ClassLabel ints), a
save_to_disk folder (multiple choice with a list of options), hub-layout JSON (generation with references);
prepared offline, then rendered, mixed and scored; bad rows, missing columns and unknown splits."""
import json
import warnings

import datasets
import pytest

from flan.cli import main
from flan.evaluate import build_requests, request_metrics
from flan.loaders import DataError, load_split
from flan.mixture import ExampleStream, Mixture
from flan.prepare import prepare
from flan.registry import load_registry
from flan.scorer import GenResult, RankResult

CB = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                        "idx": datasets.Value("int32"),
                        "label": datasets.ClassLabel(names=["entailment", "contradiction", "neutral"])})


def cb_rows(n, bad_at=None):
    rows = {"premise": [f"premise {i}" for i in range(n)], "hypothesis": [f"hyp {i}" for i in range(n)],
            "idx": list(range(n)), "label": [i % 3 for i in range(n)]}
    if bad_at is not None:
        rows["premise"][bad_at] = None
    return rows


@pytest.fixture
def hub(tmp_path):
    """A local copy in the hub's layouts: super_glue/cb parquet, hellaswag save_to_disk, nq_open JSON."""
    root = tmp_path / "hub"
    for split, n in (("train", 12), ("validation", 6), ("test", 4)):
        ds = datasets.Dataset.from_dict(cb_rows(n), features=CB)
        if split == "test":  # SuperGLUE keeps test rows without a label: -1, left out
            ds = datasets.Dataset.from_dict({**cb_rows(n), "label": [-1] * n}, features=CB)
        (root / "super_glue" / "cb" / split).mkdir(parents=True)
        ds.to_parquet(str(root / "super_glue" / "cb" / split / "0000.parquet"))
    hs = {s: datasets.Dataset.from_dict({"ctx": [f"ctx {i}" for i in range(n)],
                                         "endings": [[f"e{i}{j}" for j in range(4)] for i in range(n)],
                                         "label": [str(i % 4) for i in range(n)]}) for s, n in (("train", 10),
                                                                                                ("validation", 5))}
    datasets.DatasetDict(hs).save_to_disk(str(root / "Rowan" / "hellaswag"))
    nq = root / "nq_open"
    nq.mkdir()
    for split, n in (("train", 9), ("validation", 4)):
        datasets.Dataset.from_dict({"question": [f"who {i}" for i in range(n)],
                                    "answer": [[f"ans {i}", f"alt {i}"] for i in range(n)]}).to_json(
            str(nq / f"{split}-00000-of-00001.json"))
    return root


def test_prepare_offline_then_render_mix_and_score(hub, tmp_path):
    out, reg = tmp_path / "data", load_registry()
    for name in ("cb", "hellaswag", "natural_questions"):
        manifest, wrote = prepare(reg.get(name), out_dir=out, from_dir=hub, progress=False)
        assert wrote and manifest["complete"]
    m = json.loads((out / "cb" / "manifest.json").read_text())
    assert m["source"]["hub"] == "super_glue" and m["splits"]["train"]["rows"] == 12
    assert set(m["splits"]) == {"train", "validation"} and len(m["splits"]["train"]["sha256"]) == 64
    cb = load_split(reg.get("cb"), "validation", data_dir=out).rows
    assert cb[2] == {"premise": "premise 2", "hypothesis": "hyp 2", "label": "neutral", "label_idx": 2, "idx": 2}
    hs = load_split(reg.get("hellaswag"), "train", data_dir=out).rows
    assert hs[1]["label"] == 1 and hs[1]["answer"] == "e11"
    nq = load_split(reg.get("natural_questions"), "validation", data_dir=out).rows
    assert nq[0] == {"question": "who 0", "answers": ["ans 0", "alt 0"], "answer": "ans 0"}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mix = Mixture.build(reg, heldout="misc", split="train", data_dir=out, cap=5, seed=1)
    assert [t.name for t in mix.tasks] == ["cb", "hellaswag", "natural_questions"]
    keys = ExampleStream(mix).take(mix.epoch_len)
    assert sorted({k[0] for k in keys}) == ["cb", "hellaswag", "natural_questions"] and len(keys) == 15
    assert all(mix.render(k).prompt for k in keys)

    for name, rows in (("cb", cb), ("hellaswag", load_split(reg.get("hellaswag"), "validation", data_dir=out).rows),
                       ("natural_questions", nq)):
        spec = reg.get(name)
        requests = build_requests(spec, rows, list(range(len(rows))), 0)
        if requests[0].options is not None:   # an oracle: the gold option scores highest
            results = [RankResult(tuple(0.0 if j == r.gold else -5.0 for j in range(len(r.options))),
                                  (1,) * len(r.options), (1,) * len(r.options)) for r in requests]
            assert request_metrics(spec, requests, results)[0]["acc"].value == 100.0
        else:
            results = [GenResult(r.target, ()) for r in requests]
            assert request_metrics(spec, requests, results)[0]["exact_match"].value == 100.0


def test_rerun_is_a_no_op_and_changed_input_is_redone(hub, tmp_path):
    spec, out = load_registry().get("cb"), tmp_path / "data"
    first, _ = prepare(spec, out_dir=out, from_dir=hub, progress=False)
    mtime = (out / "cb" / "train.jsonl").stat().st_mtime_ns
    again, wrote = prepare(spec, out_dir=out, from_dir=hub, progress=False)
    assert not wrote and again == first and (out / "cb" / "train.jsonl").stat().st_mtime_ns == mtime
    limited, wrote = prepare(spec, out_dir=out, from_dir=hub, max_rows=3, progress=False)
    assert wrote and limited["splits"]["train"]["rows"] == 3


def test_resumes_after_the_splits_already_done(hub, tmp_path):
    spec, out = load_registry().get("cb"), tmp_path / "data"
    prepare(spec, out_dir=out, from_dir=hub, progress=False)
    manifest_path = out / "cb" / "manifest.json"
    m = json.loads(manifest_path.read_text())
    m["complete"] = False            # as if killed before validation was written
    del m["splits"]["validation"]
    (out / "cb" / "validation.jsonl").unlink()
    manifest_path.write_text(json.dumps(m))
    train_mtime = (out / "cb" / "train.jsonl").stat().st_mtime_ns
    resumed, wrote = prepare(spec, out_dir=out, from_dir=hub, progress=False)
    assert wrote and resumed["complete"] and resumed["splits"]["validation"]["rows"] == 6
    assert (out / "cb" / "train.jsonl").stat().st_mtime_ns == train_mtime


def test_bad_row_names_dataset_split_and_row_or_is_skipped_and_counted(hub, tmp_path):
    path = hub / "super_glue" / "cb" / "train" / "0000.parquet"
    datasets.Dataset.from_dict(cb_rows(12, bad_at=7), features=CB).to_parquet(str(path))
    spec = load_registry().get("cb")
    with pytest.raises(DataError, match=r"dataset cb, split train \(hub split train in .*\), row 7: "
                                        r"missing field 'premise'.*--data.bad_rows=skip"):
        prepare(spec, out_dir=tmp_path / "a", from_dir=hub, progress=False)
    assert not (tmp_path / "a" / "cb" / "train.jsonl").exists()
    m, _ = prepare(spec, out_dir=tmp_path / "b", from_dir=hub, bad_rows="skip", progress=False)
    assert (m["splits"]["train"]["rows"], m["splits"]["train"]["skipped"]) == (11, 1)


def test_missing_column_and_unknown_split_each_give_one_clear_error(hub, tmp_path):
    spec = load_registry().get("cb")
    folder = hub / "super_glue" / "cb"
    datasets.Dataset.from_dict({k: v for k, v in cb_rows(6).items() if k != "hypothesis"}).to_parquet(
        str(folder / "validation" / "0000.parquet"))
    with pytest.raises(DataError, match=r"dataset cb, split validation .* hub column 'hypothesis' missing \(it has premise, idx, label\)"):
        prepare(spec, out_dir=tmp_path / "a", from_dir=hub, progress=False)
    (folder / "validation" / "0000.parquet").unlink()
    (folder / "validation").rmdir()
    with pytest.raises(DataError, match=r"hub split 'validation' not found under .*found: test, train"):
        prepare(spec, out_dir=tmp_path / "a", from_dir=hub, progress=False)


def test_never_writes_into_a_folder_it_did_not_make(hub, tmp_path):
    (tmp_path / "data" / "cb").mkdir(parents=True)
    (tmp_path / "data" / "cb" / "train.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="did not write; it never overwrites"):
        prepare(load_registry().get("cb"), out_dir=tmp_path / "data", from_dir=hub, progress=False)
    assert (tmp_path / "data" / "cb" / "train.jsonl").read_text() == "{}\n"


def test_hub_failure_says_what_it_tried_and_how_to_prepare_offline(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'super_glue' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"tried the Hugging Face hub dataset 'super_glue' config 'cb' split 'train'"
                                        r".*flan data prepare cb --from DIR"):
        prepare(load_registry().get("cb"), out_dir=tmp_path, progress=False)


def test_cli_prepare_then_preview_reads_the_prepared_copy(hub, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["data", "prepare", "cb", "--from", str(hub), "--out", str(out)]) == 0
    assert "cb: prepared: train 12, validation 6" in capsys.readouterr().out
    assert main(["data", "prepare", "cb", "--from", str(hub), "--out", str(out)]) == 0
    assert "cb: up to date" in capsys.readouterr().out
    assert main(["data", "preview", "cb", "--n", "1", f"--data.prepared_dir={out}"]) == 0
    assert "premise 0" in capsys.readouterr().out
