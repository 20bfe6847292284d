"""The instruction-tuning mixture: examples-proportional with a cap, leave-one-cluster-out, seeded.

    mix = Mixture.from_config(cfg, split="train")        # tasks, sizes, rates for cfg.data.heldout_cluster
    stream = TuningStream(cfg, tokenizer)                # packed Batches for engine/train.py
    batch = stream.next_batch(); state = stream.state_dict(); stream.load_state_dict(state)

Which datasets (`eligible_tasks`): every registry task outside the held-out cluster and the clusters FLAN
also excludes with it (flan/tasks/_clusters.toml), within data.train_clusters when given, that has the split
locally (or is derived); data.templates_per_dataset keeps each dataset's first k templates. Datasets without
local data are listed in `Mixture.missing`.

Rates (Raffel et al.'s examples-proportional mixing, FLAN's cap 3000): with n_d examples in dataset d
and cap K, rate_d = min(n_d, K) / sum_e min(n_e, K). An epoch takes exactly min(n_d, K) examples of each
dataset, a fresh seeded sample of its rows, each with a seeded random template, shuffled together; so
every epoch realises the rates exactly. Epoch e's order comes from numpy's generator seeded with
(seed, e): the same seed gives the same stream on any machine.

Memory: the mixture holds no dataset. Each split is a RowIndex (8 bytes per row, rows read by byte offset
when an example is rendered); an epoch's order is three integer arrays of min(n_d, cap) entries per dataset.

Resuming: TuningStream's state is the stream position (epoch, index) plus the keys (dataset, row,
template) of the examples waiting in the packer's pool; loading it re-renders those and continues with
the very batches the uninterrupted run would have produced.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from engine.batch import Batch
from engine.config import Config
from flan.loaders import data_dirs, has_split, load_split, open_split
from flan.packing import DEFAULT_POOL, Segment, choose_segments, encode_pairs, rows_to_batch
from flan.registry import Registry, TaskSpec, load_registry
from flan.templates import TEMPLATES_DIR, RenderedExample, Template, load_templates, render_template

ExampleKey = tuple[str, int, int]  # (dataset, row index, template index)


def mixing_rates(sizes: dict[str, int], cap: int) -> dict[str, float]:
    """Examples-proportional rates with a per-dataset cap: min(n_d, cap) / sum_e min(n_e, cap)."""
    if cap < 1:
        raise ValueError(f"mixture cap is {cap}; it must be at least 1 (FLAN used 3000)")
    capped = {name: min(n, cap) for name, n in sizes.items()}
    total = sum(capped.values())
    if total == 0:
        raise ValueError("the mixture has no examples: every dataset is empty")
    return {name: m / total for name, m in capped.items()}


def eligible_tasks(registry: Registry, heldout: str | None, train_clusters: str = "") -> list[TaskSpec]:
    """The mixture's datasets before local availability: every task outside the held-out cluster and FLAN's
    exclusions with it, narrowed to the comma list `train_clusters` when given (data.train_clusters)."""
    chosen = [c.strip() for c in train_clusters.split(",") if c.strip()]
    for c in chosen:
        registry.cluster(c)  # an unknown name stops here, listing the known ones
    return [t for t in registry.training_tasks(heldout) if not chosen or t.cluster in chosen]


@dataclass
class Mixture:
    tasks: list[TaskSpec]             # in the mixture, sorted by name
    rows: dict[str, Sequence[dict]]   # a RowIndex per dataset when streamed (rows read by byte offset)
    templates: dict[str, tuple[Template, ...]]
    cap: int
    seed: int
    split: str
    missing: list[str]                # eligible tasks without local data for this split
    skipped_rows: dict[str, int]      # malformed rows skipped per task (bad_rows="skip")
    instruction_format: str = "flan"  # data.instruction_format: templates, inputs alone, or dataset-name prefix

    def __post_init__(self):
        self._by_name = {t.name: t for t in self.tasks}

    @classmethod
    def build(cls, registry: Registry, *, heldout: str | None, split: str, data_dir, cap: int,
              seed: int, bad_rows: str = "error", templates_dir=TEMPLATES_DIR, train_clusters: str = "",
              templates_per_dataset: int = 0, instruction_format: str = "flan",
              stream: bool = True) -> "Mixture":
        """stream=True reads rows on demand by byte offset (flan/loaders.RowIndex), never a whole dataset;
        stream=False loads every split into memory first. Both give the same examples in the same order."""
        tasks, missing, rows, skipped, templates = [], [], {}, {}, {}
        for spec in sorted(eligible_tasks(registry, heldout, train_clusters), key=lambda t: t.name):
            if not has_split(spec, split, data_dir):
                missing.append(spec.name)
                continue
            if stream:
                split_rows, split_skipped = open_split(spec, split, data_dir=data_dir, bad_rows=bad_rows, seed=seed)
            else:
                loaded = load_split(spec, split, data_dir=data_dir, bad_rows=bad_rows, seed=seed)
                split_rows, split_skipped = loaded.rows, loaded.skipped
            if not len(split_rows):
                missing.append(spec.name)
                continue
            tasks.append(spec)
            rows[spec.name] = split_rows
            skipped[spec.name] = len(split_skipped)
            templates[spec.name] = load_templates(spec, templates_dir)[:templates_per_dataset or None]
        if not tasks:
            raise ValueError(f"no dataset has a local {split} split outside the held-out cluster {heldout!r}")
        if sum(skipped.values()):
            warnings.warn(f"{split} mixture: skipped {sum(skipped.values())} malformed rows (data.bad_rows=skip): "
                          + ", ".join(f"{name} {n}" for name, n in skipped.items() if n), stacklevel=2)
        return cls(tasks, rows, templates, cap, seed, split, missing, skipped, instruction_format)

    @classmethod
    def from_config(cls, cfg: Config, split: str = "train") -> "Mixture":
        d = cfg.data
        return cls.build(load_registry(), heldout=d.heldout_cluster or None, split=split,
                         data_dir=data_dirs(cfg), cap=d.mixture_cap, seed=cfg.train.seed,
                         bad_rows=d.bad_rows, train_clusters=d.train_clusters,
                         templates_per_dataset=d.templates_per_dataset, instruction_format=d.instruction_format)

    @property
    def sizes(self) -> dict[str, int]:
        return {t.name: len(self.rows[t.name]) for t in self.tasks}

    @property
    def per_epoch(self) -> dict[str, int]:
        """Examples each dataset contributes to one epoch: min(n_d, cap)."""
        return {name: min(n, self.cap) for name, n in self.sizes.items()}

    @property
    def rates(self) -> dict[str, float]:
        return mixing_rates(self.sizes, self.cap)

    @property
    def epoch_len(self) -> int:
        return sum(self.per_epoch.values())

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(task index, row index, template index) of every example of one epoch, in stream order."""
        rng = np.random.default_rng([self.seed, epoch])
        task_idx, row_idx, tmpl_idx = [], [], []
        for i, spec in enumerate(self.tasks):
            n, m = len(self.rows[spec.name]), self.per_epoch[spec.name]
            row_idx.append(rng.permutation(n)[:m])
            tmpl_idx.append(rng.integers(0, len(self.templates[spec.name]), size=m))
            task_idx.append(np.full(m, i))
        order = rng.permutation(self.epoch_len)
        return (np.concatenate(task_idx)[order], np.concatenate(row_idx)[order],
                np.concatenate(tmpl_idx)[order])

    def render(self, key: ExampleKey) -> RenderedExample:
        name, row, template = key
        spec = self._by_name.get(name)
        if spec is None:
            raise ValueError(f"dataset {name!r} is not in this mixture; it has {', '.join(self.sizes)}")
        return render_template(spec, self.templates[name][template], self.rows[name][row], self.instruction_format)


class ExampleStream:
    """The mixture's examples one after another, epoch after epoch, with a restorable position."""

    def __init__(self, mixture: Mixture, epoch: int = 0, index: int = 0):
        self.mixture = mixture
        self.epoch, self.index = epoch, index
        self._order = None

    def take(self, n: int) -> list[ExampleKey]:
        keys = []
        names = [t.name for t in self.mixture.tasks]
        while len(keys) < n:
            if self._order is None:
                self._order = self.mixture.epoch_order(self.epoch)
            tasks, rows, tmpls = self._order
            end = min(len(tasks), self.index + n - len(keys))
            keys += [(names[t], int(r), int(k)) for t, r, k in
                     zip(tasks[self.index:end].tolist(), rows[self.index:end], tmpls[self.index:end])]
            self.index = end
            if self.index == len(tasks):
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return keys


class TuningStream:
    """Packed instruction-tuning batches for engine/train.py.

    Rows hold data.input_len + data.target_len tokens (FLAN: 1024 + 256), so any truncated example fits;
    each next_batch() returns train.batch_size rows as a Batch. state_dict() is JSON-serialisable.
    val_batches(n) packs the validation splits of the same datasets, from the start every time.
    """

    def __init__(self, cfg: Config, tokenizer, split: str = "train", *, mixture: Mixture | None = None,
                 pool: int = DEFAULT_POOL):
        self.cfg = cfg
        self.mixture = mixture or Mixture.from_config(cfg, split)
        self.tokenizer = tokenizer
        self.input_len, self.target_len = cfg.data.input_len, cfg.data.target_len
        self.row_len = self.input_len + self.target_len
        self.batch_size = cfg.train.batch_size
        self.pool_size = pool
        self.examples = ExampleStream(self.mixture)
        self.pool: list[tuple[ExampleKey, Segment]] = []
        self.tokens_used = self.tokens_total = 0

    def _segments(self, keys: list[ExampleKey]) -> list[Segment]:
        rendered = [self.mixture.render(k) for k in keys]
        return encode_pairs(self.tokenizer, [r.prompt for r in rendered], [r.target for r in rendered],
                            input_len=self.input_len, target_len=self.target_len)

    def _refill(self):
        keys = self.examples.take(self.pool_size - len(self.pool))
        self.pool += list(zip(keys, self._segments(keys)))

    def next_rows(self, n: int) -> list[list[Segment]]:
        rows = []
        for _ in range(n):
            self._refill()
            picked = choose_segments([seg.length for _, seg in self.pool], self.row_len)
            rows.append([self.pool[j][1] for j in picked])
            taken = set(picked)
            self.pool = [item for j, item in enumerate(self.pool) if j not in taken]
            self.tokens_used += sum(s.length for s in rows[-1])
            self.tokens_total += self.row_len
        return rows

    def next_batch(self) -> Batch:
        return rows_to_batch(self.next_rows(self.batch_size), self.row_len, self.tokenizer.pad_id)

    def val_batches(self, n: int) -> list[Batch]:
        """The first n batches of the validation mixture (the same every time; train state untouched)."""
        held_out = TuningStream(self.cfg, self.tokenizer, "validation", pool=self.pool_size)
        return [held_out.next_batch() for _ in range(n)]

    @property
    def efficiency(self) -> float:
        """Non-padding share of all row positions emitted so far."""
        return self.tokens_used / self.tokens_total if self.tokens_total else 0.0

    def state_dict(self) -> dict:
        return {"epoch": self.examples.epoch, "index": self.examples.index,
                "pool": [list(key) for key, _ in self.pool], "seed": self.mixture.seed,
                "tokens_used": self.tokens_used, "tokens_total": self.tokens_total}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.mixture.seed:
            raise ValueError(f"data state was saved with seed {state.get('seed')} but this run uses "
                             f"{self.mixture.seed}; resume with the same --train.seed")
        self.examples = ExampleStream(self.mixture, state["epoch"], state["index"])
        keys = [(str(name), int(row), int(tmpl)) for name, row, tmpl in state["pool"]]
        self.pool = list(zip(keys, self._segments(keys)))
        self.tokens_used, self.tokens_total = state["tokens_used"], state["tokens_total"]
