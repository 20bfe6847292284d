"""A pretraining corpus streamed from files (`data.corpus`): a glob of .txt, .jsonl or .parquet files, never held
in memory, read in a seeded shard order, sharded across data-parallel ranks, resumable exactly.

    source = StreamingCorpus(cfg, tokenizer, dp_rank, dp_size)   # a BatchSource (engine/data_source.py)
    for text in corpus_texts(cfg, limit=1000): ...                # the same records, for the tokenizer trainer

Records: a non-empty line of a .txt file, the `text` field of a JSONL row, the `text` column of a parquet row.
A shard is a byte range of about data.corpus_shard_mb of a .txt/.jsonl file (the lines that start in it) or one
row group of a parquet file. Each epoch visits the shards in a seeded permutation; rank r of dp takes shards
r, r + dp, r + 2 dp, ... of it, so the ranks read disjoint shards whose union is the dp=1 stream. A shard's
records are tokenized (EOS after each), concatenated, cut into rows of seq_len + 1 tokens (the tail shorter
than a row is dropped) and visited in a seeded order. Only one shard's tokens are in memory at a time.

The position of every rank (epoch, shard, row) is saved in checkpoints: each rank reads only its own shards,
so state_dict() gathers all of them (one small all-gather at each save) and a resumed rank continues at its
own position, exactly where it stopped. A resume must keep parallel.dp and the corpus's shards as they were.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.batch import Batch
from engine.config import Config
from engine.corpus import encode_lines, rows_to_batch, windows
from engine.data_files import DataError, bad_row, json_rows, report_skipped, text_lines
from engine.data_source import rank_rows
from engine.paths import shared_data_dir
from engine.tokenizer import Tokenizer

KINDS = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class Shard:
    path: Path
    kind: str
    start: int          # byte offset (text, jsonl) or row group (parquet)
    end: int | None     # end byte offset; None for a parquet row group


def corpus_files(pattern: str, field: str) -> list[Path]:
    """The files a glob names (sorted), each a .txt, .jsonl or .parquet file."""
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"--{field}={pattern}: no file matches; give a glob of .txt, .jsonl or .parquet files "
                        "(quote it so the shell leaves it alone)")
    for path in files:
        if path.suffix not in KINDS:
            raise DataError(f"{path}: --{field} reads .txt, .jsonl and .parquet files, not {path.suffix or 'this'};"
                            " narrow the glob or convert the file")
    return files


def file_shards(path: Path, shard_bytes: int | None) -> list[Shard]:
    """A file's shards: its parquet row groups, or byte ranges of `shard_bytes` (None: the whole file)."""
    kind = KINDS[path.suffix]
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            groups = pq.ParquetFile(path).metadata.num_row_groups
        except Exception as e:  # pyarrow raises its own ArrowInvalid for a damaged file
            raise DataError(f"{path}: not a readable parquet file ({e}); restore or re-export it") from None
        return [Shard(path, kind, g, None) for g in range(groups)]
    size = path.stat().st_size
    step = shard_bytes or max(size, 1)
    return [Shard(path, kind, start, min(start + step, size)) for start in range(0, size, step)]


def corpus_shards(pattern: str, shard_mb: float | None, field: str = "data.corpus") -> list[Shard]:
    """Every shard of the files a glob names, in file order (shard_mb None: one per text/JSONL file)."""
    shard_bytes = max(1, int(shard_mb * (1 << 20))) if shard_mb else None
    return [s for path in corpus_files(pattern, field) for s in file_shards(path, shard_bytes)]


def shard_texts(shard: Shard, bad_rows: str, skipped: list[str]):
    """The records of one shard, in file order; a bad row is reported by file and line (parquet: row)."""
    if shard.kind == "text":
        yield from text_lines(shard.path, bad_rows, skipped, shard.start, shard.end)
        return
    if shard.kind == "jsonl":
        for lineno, row in json_rows(shard.path, bad_rows, skipped, shard.start, shard.end):
            if not isinstance(row.get("text"), str):
                why = "no `text` field" if "text" not in row else f"`text` is {type(row['text']).__name__}"
                bad_row(shard.path, lineno(), f"{why}; a corpus row is {{\"text\": \"...\"}}", bad_rows, skipped)
            elif row["text"].strip():
                yield row["text"].strip()
        return
    import pyarrow.parquet as pq

    file = pq.ParquetFile(shard.path)
    if "text" not in file.schema_arrow.names:
        raise DataError(f"{shard.path}: no `text` column (columns: {', '.join(file.schema_arrow.names)}); "
                        "the corpus reads a column named text")
    first = sum(file.metadata.row_group(g).num_rows for g in range(shard.start))
    for i, text in enumerate(file.read_row_group(shard.start, columns=["text"]).column("text").to_pylist()):
        if not isinstance(text, str):
            bad_row(shard.path, first + i + 1, f"row's text is {type(text).__name__}, not a string", bad_rows,
                    skipped)
        elif text.strip():
            yield text.strip()


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def corpus_texts(cfg: Config, limit: int):
    """Up to `limit` records of data.corpus in the first epoch's shard order (all ranks' shards): what the
    tokenizer trainer samples from."""
    shards = corpus_shards(cfg.data.corpus, cfg.data.corpus_shard_mb)
    skipped: list[str] = []
    taken = 0
    for i in epoch_order(len(shards), cfg.train.seed, 0):
        for text in shard_texts(shards[i], cfg.data.bad_rows, skipped):
            if taken == limit:
                report_skipped("data.corpus", skipped)
                return
            taken += 1
            yield text
    report_skipped("data.corpus", skipped)


class StreamingCorpus:
    """This data-parallel rank's rows of a streamed corpus; see the module docstring for the order and state."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer, rank: int, size: int):
        d = cfg.data
        self.tokenizer, self.rank, self.size = tokenizer, rank, size
        self.pattern, self.seq_len, self.bad_rows, self.seed = d.corpus, d.seq_len, d.bad_rows, cfg.train.seed
        self.batch_size = cfg.train.batch_size
        self.shards = corpus_shards(d.corpus, d.corpus_shard_mb)
        if len(self.shards) < size:
            raise DataError(f"--data.corpus={d.corpus}: {len(self.shards)} shards cannot feed parallel.dp={size} "
                            "ranks; add files or lower --data.corpus_shard_mb")
        self.valid = d.corpus_valid or str(shared_data_dir(d.data_dir or None) / "corpus" / "valid.txt")
        self.epoch, self.shard, self.row = 0, 0, 0
        self._rows = None   # the current shard's rows, in their seeded order

    def _my_shards(self, epoch: int) -> list[int]:
        return epoch_order(len(self.shards), self.seed, epoch)[self.rank::self.size]

    def _shard_rows(self, index: int) -> torch.Tensor:
        skipped: list[str] = []
        shard = self.shards[index]
        texts = list(shard_texts(shard, self.bad_rows, skipped))
        report_skipped(f"data.corpus shard {shard.path}@{shard.start}", skipped)
        rows = windows(encode_lines(self.tokenizer, texts), self.seq_len)
        gen = torch.Generator().manual_seed((self.seed * 1000003 + self.epoch) * 1000003 + index)
        return rows[torch.randperm(len(rows), generator=gen)]

    def _next_row(self) -> torch.Tensor:
        """The row at (epoch, shard, row); the position then moves on, to the next shard (and epoch) when this
        one is used up, so that the saved position is always the next row's."""
        empty = 0
        while True:
            if self._rows is None:
                self._rows = self._shard_rows(self._my_shards(self.epoch)[self.shard])
            if self.row < len(self._rows):
                row = self._rows[self.row]
                self.row += 1
                if self.row == len(self._rows):
                    self._next_shard()
                return row
            self._next_shard()  # a shard shorter than one row
            empty += 1
            if empty > len(self.shards):
                raise DataError(f"--data.corpus={self.pattern}: rank {self.rank}'s shards hold no row of "
                                f"data.seq_len={self.seq_len} + 1 tokens; add text or shorten rows")

    def _next_shard(self) -> None:
        self.shard, self.row, self._rows = self.shard + 1, 0, None
        if self.shard == len(self._my_shards(self.epoch)):
            self.epoch, self.shard = self.epoch + 1, 0

    def next_batch(self) -> Batch:
        return rows_to_batch(torch.stack([self._next_row() for _ in range(self.batch_size // self.size)]))

    def val_batches(self, n: int) -> list[Batch]:
        """This rank's block of each of the first n global batches of the validation files (data.corpus_valid,
        or the shared corpus/valid.txt), read in file order only as far as those batches need."""
        b, skipped, pieces, tokens = self.batch_size, [], [], 0
        shards = corpus_shards(self.valid, None, "data.corpus_valid")
        for text in (t for shard in shards for t in shard_texts(shard, self.bad_rows, skipped)):
            if tokens > n * b * self.seq_len:
                break
            pieces.append(encode_lines(self.tokenizer, [text]))
            tokens += len(pieces[-1])
        report_skipped("data.corpus_valid", skipped)
        rows = windows(torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64), self.seq_len)
        if len(rows) < b:
            raise DataError(f"--data.corpus_valid={self.valid}: fewer than train.batch_size={b} validation rows of "
                            f"data.seq_len={self.seq_len} + 1 tokens; point it at more text, or set "
                            "--train.val_every=0")
        return [rank_rows(rows_to_batch(rows[i * b:(i + 1) * b]), self.rank, self.size)
                for i in range(min(n, len(rows) // b))]

    def state_dict(self) -> dict:
        """Every rank's position (each rank calls it at the same step: one all-gather of three ints)."""
        mine = torch.tensor([self.epoch, self.shard, self.row], dtype=torch.int64)
        dist = torch.distributed
        if self.size > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            parts = [torch.empty(4, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, torch.cat([torch.tensor([self.rank]), mine]).to(device))
            ranks = {int(p[0]): p[1:].tolist() for p in parts}  # tensor/pipeline peers repeat their replica's
            positions = [ranks[r] for r in range(self.size)]
        else:
            positions = [mine.tolist()]
        return {"stream": "corpus", "dp": self.size, "shards": len(self.shards), "positions": positions}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stream") != "corpus":
            raise DataError("the checkpoint's data position is of the in-memory corpus (data.corpus was empty); "
                            "resume without --data.corpus or start a new --train.run_dir")
        if state["dp"] != self.size or state["shards"] != len(self.shards):
            raise DataError(f"the checkpoint's corpus position was saved for parallel.dp={state['dp']} over "
                            f"{state['shards']} shards; this run has dp={self.size} over {len(self.shards)} "
                            "(data.corpus, data.corpus_shard_mb); resume with those, or start a new --train.run_dir")
        self.epoch, self.shard, self.row = (int(v) for v in state["positions"][self.rank])
        self._rows = None
