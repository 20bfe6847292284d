"""The mixer at FLAN's size: `python -m benchmarks.mixer --scale flan`.

Writes, in a temporary folder (removed afterwards), one train.jsonl per registry dataset with FLAN's train
row count (TFDS figures, rounded; 62 datasets, about 85M rows), the way `flan data prepare` writes them
(with a manifest, so the streaming loader only scans line starts). Rows are the dataset's real sample rows
from the shared data, cycled, or, for datasets without a sample, short rows built from the task's fields.
Then it streams packed batches through TuningStream (every dataset, examples-proportional with FLAN's
30k cap... the cap is --cap, default 30000; FLAN's budgets 1024 + 256) and reports:
  - build_s: indexing every file and drawing the first epoch's order
  - examples per CPU second of this process (one core) while streaming
  - peak resident memory of the process (ru_maxrss), generation included
Results go to benchmarks/results/mixer-flan/ (results.json, table.md) with the command, date and commit.
"""
from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import REPO_ROOT, environment, print_table, write_json
from engine.config import load_config
from engine.paths import shared_data_dir
from engine.tokenizer import load_tokenizer
from flan.loaders import SPLITS, has_split
from flan.mixture import Mixture, TuningStream
from flan.registry import load_registry

# FLAN's train rows per dataset (TFDS train split sizes, rounded; ANLI R1-R3 and MNLI summed as FLAN does).
FLAN_TRAIN_ROWS = {
    "aeslc": 14_436, "ag_news_subset": 120_000, "anli": 162_865, "arc_challenge": 1_119, "arc_easy": 2_251,
    "bool_q": 9_427, "cb": 250, "cnn_dailymail": 287_113, "cola": 8_551, "common_gen": 67_389, "copa": 400,
    "coqa": 7_199, "cosmos_qa": 25_262, "dart": 62_659, "definite_pronoun_resolution": 1_322, "drop": 77_409,
    "e2e_nlg": 33_525, "gigaword": 3_803_957, "glue_mrpc": 3_668, "glue_qqp": 363_846, "hellaswag": 39_905,
    "imdb_reviews": 25_000, "mnli": 392_702, "multi_news": 44_972, "multirc": 27_243, "natural_questions": 87_925,
    "newsroom": 995_041, "openbookqa": 4_957, "opinion_abstracts_idebate": 1_992,
    "opinion_abstracts_rotten_tomatoes": 3_731, "para_crawl_enes": 21_987_267, "paws_wiki": 49_401, "piqa": 16_113,
    "qnli": 104_743, "quac": 83_568, "record": 100_730, "rte": 2_490, "samsum": 14_732, "sentiment140": 1_600_000,
    "snli": 550_152, "squad": 87_599, "sst2": 67_349, "story_cloze": 1_871, "stsb": 5_749, "trec": 5_452,
    "trivia_qa": 138_384, "web_nlg_en": 35_426, "wic": 5_428, "wiki_lingua_english_en": 99_020,
    "winogrande": 40_398, "wmt14_enfr": 40_836_715, "wmt16_translate_csen": 997_712,
    "wmt16_translate_deen": 4_548_885, "wmt16_translate_fien": 2_073_394, "wmt16_translate_roen": 610_320,
    "wmt16_translate_ruen": 1_516_162, "wmt16_translate_tren": 205_756, "wnli": 635, "wsc": 554, "wsc273": 273,
    "xsum": 204_045, "yelp_polarity_reviews": 560_000,
}
SAMPLE_LINES = 500
CHUNK_LINES = 1 << 20


def _synthetic_row(spec, i: int) -> dict:
    """A short valid row of the task's fields (for datasets the shared data has no sample of)."""
    words = f"alpha beta gamma delta {spec.name} row {i} epsilon zeta eta theta".split()
    row = {}
    for name, f in spec.fields.items():
        row[name] = {"text": " ".join(words), "int": 0, "float": 1.0, "list": ["one answer", "two answer"],
                     "numbered": ["first", "second"], "triples": [["s", "p", "o"]]}[f.type]
    if spec.labels:
        row[spec.labels.field] = float(spec.labels.values[i % 2]) if spec.fields[spec.labels.field].type == "float" \
            else spec.labels.values[i % len(spec.labels.values)]
    if spec.choices and spec.choices.label_field:
        row[spec.choices.label_field] = i % 2
    if spec.choices and spec.choices.answer_field:
        row[spec.choices.answer_field] = ["one answer"] if spec.fields[spec.choices.answer_field].type == "list" \
            else "one answer"
        if spec.choices.list_field:
            row[spec.choices.list_field] = ["one answer", "two answer"]
    return row


def _sample_lines(spec, shared: Path) -> list[bytes]:
    for split in SPLITS:
        if has_split(spec, split, shared):
            with (shared / spec.data / f"{split}.jsonl").open("rb") as f:
                lines = [ln if ln.endswith(b"\n") else ln + b"\n" for ln in f if ln.strip()][:SAMPLE_LINES]
            if lines:
                return lines
    return [(json.dumps(_synthetic_row(spec, i)) + "\n").encode() for i in range(8)]


def generate(out: Path, shared: Path) -> dict:
    """FLAN-sized train files under `out`; returns {dataset: rows}."""
    counts = {}
    for spec in load_registry().tasks.values():
        if spec.derived:
            continue
        n = FLAN_TRAIN_ROWS[spec.name]
        lines = _sample_lines(spec, shared)
        folder = out / spec.data
        folder.mkdir(parents=True)
        with (folder / "train.jsonl").open("wb") as f:
            block = b"".join(lines[i % len(lines)] for i in range(min(n, CHUNK_LINES)))
            full, rest = divmod(n, min(n, CHUNK_LINES))
            for _ in range(full):
                f.write(block)
            f.write(b"".join(lines[i % len(lines)] for i in range(rest)))
        (folder / "manifest.json").write_text(json.dumps({"complete": True, "splits": {"train": {"rows": n}}}))
        counts[spec.name] = n
    return counts


def run_flan_scale(args) -> int:
    cfg = load_config(args.config, ["--data.input_len=1024", "--data.target_len=256", "--data.heldout_cluster=",
                                    f"--data.mixture_cap={args.cap}"]
                      + ([f"--data.tokenizer={args.tokenizer}"] if args.tokenizer else []))
    tokenizer = load_tokenizer(cfg)
    shared = shared_data_dir(cfg.data.data_dir or None)
    tmp = Path(tempfile.mkdtemp(prefix="flan-mixer-"))
    try:
        t0 = time.perf_counter()
        counts = generate(tmp, shared)
        gen_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in tmp.rglob("train.jsonl"))
        t0, c0 = time.perf_counter(), time.process_time()
        mixture = Mixture.build(load_registry(), heldout=None, split="train", data_dir=(tmp, shared),
                                cap=cfg.data.mixture_cap, seed=cfg.train.seed)
        stream = TuningStream(cfg, tokenizer, mixture=mixture)
        stream.next_batch()
        build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
        start = stream.state_dict()["index"] - len(stream.pool)
        t0, c0 = time.perf_counter(), time.process_time()
        while stream.state_dict()["index"] - len(stream.pool) - start < args.examples:
            stream.next_batch()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        n = stream.state_dict()["index"] - len(stream.pool) - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"datasets": len(mixture.tasks), "rows_total": sum(mixture.sizes.values()),
           "rows_generated": sum(counts.values()), "bytes_on_disk": size, "cap": mixture.cap,
           "epoch_examples": mixture.epoch_len, "generate_s": round(gen_s, 1), "build_s": round(build_s, 1),
           "build_cpu_s": round(build_cpu, 1), "examples": n, "ex_per_s_wall": round(n / wall),
           "ex_per_s_cpu": round(n / cpu), "efficiency": round(stream.efficiency, 4),
           "peak_rss_mb": round(peak_mb)}
    print_table([row], list(row), title="Mixer at FLAN's size: streamed from a generated mixture, one process")
    command = "python -m benchmarks.mixer " + " ".join(sys.argv[1:])
    meta = {**environment(), "command": command}
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / "results" / "mixer-flan"
    write_json(out / "results.json", [row], meta=meta)
    (out / "table.md").write_text(
        f"# Mixer at FLAN's size (CPU)\n\n`{command}` on {meta['time_utc']}, commit {meta['commit']}, "
        f"{meta['machine']}, one process on a shared 2-core machine.\n\n"
        + "| " + " | ".join(row) + " |\n|" + "---|" * len(row) + "\n| " + " | ".join(str(v) for v in row.values())
        + " |\n\nGoals (issue 18): >= 20k examples per CPU second, peak RSS < 2 GB. ex_per_s_cpu is CPU time of"
        " this process (one core); wall clock is shown for reference on a machine other jobs share.\n")
    print(f"\nwrote {out / 'results.json'}")
    return 0
