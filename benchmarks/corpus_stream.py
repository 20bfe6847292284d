"""Streamed pretraining corpus (data.corpus): rows per CPU second and peak resident memory against corpus size.

    python -m benchmarks.corpus_stream --mb 50 --batches 300
    python -m benchmarks.corpus_stream --mb 500 --batches 300     # the same memory: one shard is held at a time

Writes a JSONL corpus of about --mb MB into a temporary folder (documents of 8 WikiText lines from the shared
corpus/train.txt, repeated; removed afterwards), then streams --batches global batches of configs/tiny.toml
(16 rows of 257 tokens) from it with the cached tokenizer through StreamingCorpus, at the default shard size.
Reports rows and tokens per CPU second of this process (reading, parsing, tokenizing, cutting rows) and the
process's peak resident memory (ru_maxrss, generation included). Run each size in its own process: ru_maxrss
is the process's peak. Appends to runs/bench/corpus_stream/results.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.harness import environment, output_dir, write_json
from engine.config import load_config
from engine.corpus_stream import StreamingCorpus
from engine.paths import shared_data_dir
from engine.tokenizer import load_tokenizer


def write_corpus(path: Path, megabytes: float) -> int:
    """A JSONL corpus of about `megabytes` MB: documents of 8 corpus lines, the corpus repeated; its size in bytes."""
    lines = [l.strip() for l in (shared_data_dir() / "corpus" / "train.txt").read_text().splitlines() if l.strip()]
    docs = [json.dumps({"text": "\n".join(lines[i:i + 8])}) + "\n" for i in range(0, len(lines), 8)]
    written, target = 0, int(megabytes * 1e6)
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            for doc in docs:
                f.write(doc)
                written += len(doc.encode())
                if written >= target:
                    break
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50, help="corpus size in MB")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        size = write_corpus(corpus, args.mb)
        cfg = load_config("configs/tiny.toml", [f"--data.corpus={corpus}"])
        tokenizer = load_tokenizer(load_config("configs/tiny.toml"))  # the shared corpus's cached tokenizer
        stream = StreamingCorpus(cfg, tokenizer, 0, 1)
        started = time.process_time()
        for _ in range(args.batches):
            stream.next_batch()
        cpu = time.process_time() - started
    rows = args.batches * cfg.train.batch_size
    result = {"corpus_mb": round(size / 1e6, 1), "shards": len(stream.shards), "batches": args.batches,
              "rows_per_cpu_s": round(rows / cpu), "tokens_per_cpu_s": round(rows * cfg.data.seq_len / cpu),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(result))
    path = output_dir("corpus_stream", args.out) / "results.json"
    previous = json.loads(path.read_text())["rows"] if path.is_file() else []
    write_json(path, previous + [result], {"environment": environment(), "shard_mb": cfg.data.corpus_shard_mb})


if __name__ == "__main__":
    main()
