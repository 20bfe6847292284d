"""Run configuration: one dataclass per section, loaded from TOML, overridden by `--section.field=value`.

    cfg = load_config("configs/tiny.toml", ["--train.steps=20", "--parallel.tp=2"])

Every problem (unknown section or field, wrong type, impossible value) raises ConfigError before any work
starts, naming the file or flag, the field, what is accepted and how to fix it.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A configuration problem; the message names where it came from and how to fix it."""


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    """Tokenizer vocabulary size; also the rows of the embedding and output projection."""
    d_model: int = 512
    """Width of the residual stream."""
    n_layers: int = 8
    """Number of transformer blocks."""
    n_heads: int = 8
    """Query heads per attention layer."""
    n_kv_heads: int = 8
    """Key/value heads (grouped-query attention); must divide n_heads."""
    head_dim: int = 64
    """Width of one head; independent of d_model / n_heads (LaMDA-PT uses 128 heads of 128 at 8192)."""
    d_ff: int = 1408
    """Hidden width of the gated MLP."""
    mlp: Literal["swiglu", "geglu"] = "swiglu"
    """Gated MLP flavour: SiLU gate (Llama) or GELU gate (LaMDA-PT / T5.1.1)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding frequencies."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal init; residual output projections get init_std / sqrt(2 n_layers)."""
    attention: Literal["auto", "torch", "triton"] = "auto"
    """Attention implementation: the Triton flash kernel, the PyTorch path, or auto (`resolve_auto`: Triton on
    CUDA)."""
    attention_tiles: Literal["pointers", "tma"] = "pointers"
    """How the flash kernel (attention = triton) moves its tiles: through pointers, or through Hopper's TMA tensor
    descriptors (sm_90 or newer). Pointers until a GPU measures which is faster (gpu_suite.sh's attention-tma)."""
    attention_backward: Literal["split", "fused"] = "split"
    """The flash kernel's backward: dQ in its own kernel (deterministic), or by fp32 atomics inside the dK/dV
    kernel (FA2's one pass; not bitwise reproducible)."""
    loss: Literal["auto", "torch", "triton", "fused"] = "auto"
    """Cross-entropy: PyTorch, the Triton kernel on logits, the fused output-projection kernel, or auto
    (`resolve_auto`: fused on CUDA, which tensor parallelism runs as the vocab-parallel Triton kernel)."""
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    """Long-context rescaling of the rotary frequencies (an imported model's rope_scaling): none, linear
    (all divided by rope_factor) or llama3 (low frequencies divided, high kept, blended between)."""
    rope_factor: float = 1.0
    """The rescaling factor of rope_scaling linear and llama3."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above rope_original_max_len / this are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below rope_original_max_len / this are kept."""
    rope_original_max_len: int = 8192
    """llama3 scaling: the context length the model was pretrained at."""


@dataclass
class ParallelConfig:
    dp: int = 0
    """Data-parallel degree; 0 means whatever the world size leaves after tp x pp."""
    tp: int = 1
    """Tensor-parallel degree (innermost in the mesh)."""
    pp: int = 1
    """Pipeline-parallel degree (number of stages)."""
    sp: bool = False
    """Megatron sequence parallelism between blocks (needs tp > 1 to matter)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved schedule)."""
    schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    """Pipeline schedule."""
    microbatches: int = 1
    """Microbatches per optimizer step in the pipeline."""
    zero: Literal[0, 1] = 0
    """ZeRO stage for data parallelism (1 shards the optimizer state)."""
    bucket_mb: float = 25.0
    """Gradient all-reduce bucket size in MiB."""
    timeout_s: float = 300.0
    """Seconds a collective or a checkpoint rendezvous waits for a peer before this rank stops with an error
    (a peer that died is noticed at once over gloo; over NCCL after this long). Raise it for saves of very
    large checkpoints to slow disks."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation in backward: "full" keeps each block's input only, "selective" its matmul
    outputs (the attention core, norms and activations are recomputed)."""


@dataclass
class OptimConfig:
    name: Literal["adamw", "adafactor"] = "adamw"
    """Optimizer. FLAN tuned LaMDA-PT with Adafactor."""
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay (matrices only; norms and embeddings are not decayed)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate shape after warm-up."""
    warmup_steps: int = 20
    """Linear warm-up steps from 0 to lr."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""


@dataclass
class DataConfig:
    data_dir: str = ""
    """Folder of datasets and corpus; empty means ../shared/data beside the repo."""
    tokenizer: str = ""
    """A tokenizer file to use (SentencePiece .model or tokenizer.json, with a tokenizer_config.json beside it
    where the model has one); empty means train a SentencePiece model (cached) on the corpus and datasets."""
    tokenizer_cache: str = ".cache/tokenizer"
    """Where trained tokenizers are cached (relative to the repo root unless absolute)."""
    tokenizer_sentences: int = 200000
    """Maximum sentences SentencePiece samples when training."""
    corpus: str = ""
    """Pretraining text streamed from files: a glob (relative to the working directory) of .txt, .jsonl or
    .parquet files (a `text` field/column), read in a seeded shard order, sharded over data-parallel ranks
    (engine/corpus_stream.py); empty means the shared corpus/train.txt, held in memory. The trained tokenizer
    samples from it too."""
    corpus_valid: str = ""
    """Validation text for a streamed data.corpus (a glob, read in file order); empty: the shared corpus/valid.txt."""
    corpus_shard_mb: float = 8.0
    """A streamed corpus's unit of order and sharding: byte ranges of this size of .txt/.jsonl files (a parquet
    file's row groups are its shards); one shard's tokens are held in memory at a time."""
    seq_len: int = 256
    """Tokens per row for pretraining."""
    input_len: int = 1024
    """Instruction tuning: token budget of an example's input (FLAN: 1024)."""
    target_len: int = 256
    """Instruction tuning: token budget of an example's target (FLAN: 256)."""
    mixture_cap: int = 3000
    """Examples-proportional mixing cap per dataset (FLAN: 3000)."""
    heldout_cluster: str = "nli"
    """Cluster left out of instruction tuning and evaluated zero-shot."""
    bad_rows: Literal["error", "skip"] = "error"
    """A malformed dataset row stops with an error naming file and line, or is skipped and counted."""
    train_clusters: str = ""
    """Comma list of clusters to instruction-tune on (empty: every cluster outside the held-out exclusions)."""
    templates_per_dataset: int = 0
    """Templates per dataset in training, each dataset's first k (0: all of them; FLAN: 10)."""
    instruction_format: Literal["flan", "none", "dataset_name"] = "flan"
    """How examples are rendered (training and `flan eval`): FLAN's instruction templates, the inputs alone (no
    template), or the inputs after a dataset-name prefix like [Translation: WMT'16 Finnish to English]."""
    prepared_dir: str = "data"
    """Folder `flan data prepare` writes (relative to the working directory); datasets found there are read
    before data_dir's."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    """Output folder: metrics.jsonl, checkpoints, plots (relative to the working directory)."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Global batch in rows per optimizer step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step; batch_size must divide by it."""
    seed: int = 1234
    """One seed for weights, data order and dropout-free randomness."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast on CUDA and fp32 on CPU when auto."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where each rank runs: cuda (device LOCAL_RANK), cpu, or auto (CUDA when torch sees a GPU)."""
    log_every: int = 1
    """Progress-bar refresh interval in steps (metrics.jsonl always gets every step)."""
    val_every: int = 50
    """Validation interval in steps (0 disables)."""
    val_batches: int = 8
    """Batches per validation."""
    ckpt_every: int = 100
    """Checkpoint interval in steps (0 disables; the last step is always saved)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept."""
    resume: Literal[False, True, "auto"] = False
    """Continue from the newest intact checkpoint in run_dir: true requires one, auto continues when there is
    one and starts fresh (saying so) when not, false refuses a run_dir that holds checkpoints."""
    async_save: bool = False
    """Write checkpoints from a background thread (tensors copied to CPU memory first) while training goes on."""
    init_from: str = ""
    """Checkpoint folder whose weights start the run (instruction tuning starts from pretraining)."""
    peak_tflops: float = 0.0
    """The device's dense peak (e.g. 989 for an H100/H200 in bf16); when set, metrics.jsonl reports MFU."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard event files in <run_dir>/tensorboard (`tensorboard --logdir`)."""
    resume_from: str = ""
    """Resume from this checkpoint of run_dir instead of the newest (step-000300, or 300); implies resume."""


@dataclass
class EvalConfig:
    templates: str = "all"
    """Templates to score: all, best (picked on the dev split), or a comma list of indices."""
    limit: int = 0
    """Examples per dataset (0 = all)."""
    batch_size: int = 16
    """Requests per forward pass."""
    max_new_tokens: int = 32
    """Generation length limit."""
    few_shot: int = 0
    """Exemplars from train prepended to each prompt (0 = zero-shot)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast precision of flan eval's forward passes: bf16 on CUDA and fp32 on CPU when auto."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, source: str = "config") -> "Config":
        """Check values that are each well-typed but impossible together."""
        m, p, t, o = self.model, self.parallel, self.train, self.optim

        def fail(where: str, msg: str):
            raise ConfigError(f"{source}: {where}: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            if getattr(m, name) <= 0:
                fail(f"model.{name}", f"is {getattr(m, name)}; it must be a positive integer")
        if m.n_heads % m.n_kv_heads:
            fail("model.n_kv_heads", f"{m.n_kv_heads} does not divide model.n_heads={m.n_heads}; "
                 f"choose n_kv_heads among {_divisors(m.n_heads)}")
        if m.rope_scaling != "none" and (m.rope_factor <= 0 or m.rope_high_freq_factor <= m.rope_low_freq_factor
                                         or m.rope_original_max_len < 1):
            fail("model.rope_scaling", f"{m.rope_scaling} needs rope_factor > 0, rope_high_freq_factor > "
                 "rope_low_freq_factor and rope_original_max_len >= 1")
        if m.attention == "torch" and (m.attention_tiles, m.attention_backward) != ("pointers", "split"):
            fail("model.attention_tiles" if m.attention_tiles != "pointers" else "model.attention_backward",
                 "chooses a flash-kernel path, but model.attention is torch; set --model.attention=triton (or auto)")
        if m.head_dim % 2:
            fail("model.head_dim", f"is {m.head_dim}; rotary embeddings need an even head_dim")
        for name in ("tp", "pp", "virtual_stages", "microbatches"):
            if getattr(p, name) < 1:
                fail(f"parallel.{name}", f"is {getattr(p, name)}; it must be at least 1")
        if p.dp < 0:
            fail("parallel.dp", f"is {p.dp}; use 0 (derive from the world size) or a positive integer")
        problem = layout_problem(m, p.tp, p.pp, p.virtual_stages)
        if problem:
            fail(*problem)
        if p.sp and p.tp > 1:
            for name, length in (("data.seq_len", self.data.seq_len),
                                 ("data.input_len + data.target_len", self.data.input_len + self.data.target_len)):
                if length % p.tp:
                    fail("parallel.sp", f"sequence parallelism splits rows across tp={p.tp} ranks but {name}="
                         f"{length} is not a multiple of it; pick lengths divisible by {p.tp}")
        from engine.parallel.schedules import check_schedule  # pure: the schedule's own rules, checked early

        try:
            check_schedule(p.schedule, p.pp, p.microbatches, p.virtual_stages)
        except ValueError as e:
            fail("parallel", str(e))
        if p.bucket_mb != p.bucket_mb or p.bucket_mb <= 0:
            fail("parallel.bucket_mb", f"is {p.bucket_mb}; it must be a positive size in MiB")
        if not (math.isfinite(p.timeout_s) and p.timeout_s > 0):
            fail("parallel.timeout_s", f"is {p.timeout_s}; it must be a positive number of seconds")
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(t, name) < 1:
                fail(f"train.{name}", f"is {getattr(t, name)}; it must be at least 1")
        for name in ("val_every", "ckpt_every", "keep_checkpoints"):
            if getattr(t, name) < 0:
                fail(f"train.{name}", f"is {getattr(t, name)}; it must be 0 (off / keep all) or a positive integer")
        if t.val_every and t.val_batches < 1:
            fail("train.val_batches", f"is {t.val_batches}; validation (train.val_every={t.val_every}) needs at "
                 "least 1 batch, or set train.val_every=0 to turn it off")
        if t.batch_size % t.grad_accum:
            fail("train.grad_accum", f"{t.grad_accum} does not divide train.batch_size={t.batch_size}")
        if p.dp:  # with dp=0 the degree is known at launch: init_mesh asks batch_problem then
            problem = batch_problem(t, p, p.dp)
            if problem:
                fail(*problem)
        if not t.peak_tflops >= 0:
            fail("train.peak_tflops", f"is {t.peak_tflops}; give the device's dense peak, or 0 (no MFU)")
        for name, ok, accepted in (("lr", lambda v: v > 0, "a positive number"),
                                   ("weight_decay", lambda v: v >= 0, "0 or more"),
                                   ("beta1", lambda v: 0 <= v < 1, "0 <= beta1 < 1"),
                                   ("beta2", lambda v: 0 <= v < 1, "0 <= beta2 < 1"),
                                   ("eps", lambda v: v > 0, "a positive number"),
                                   ("min_lr_ratio", lambda v: 0 <= v <= 1, "0..1"),
                                   ("grad_clip", lambda v: v >= 0, "0 (off) or a positive number")):
            value = getattr(o, name)
            if not (math.isfinite(value) and ok(value)):  # nan fails every comparison: caught here too
                fail(f"optim.{name}", f"is {value}; accepted: {accepted}")
        if o.warmup_steps < 0:
            fail("optim.warmup_steps", f"is {o.warmup_steps}; it must be 0 or more")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not (math.isfinite(getattr(m, name)) and getattr(m, name) > 0):
                fail(f"model.{name}", f"is {getattr(m, name)}; it must be a positive finite number")
        d, e = self.data, self.eval
        if d.seq_len < 2:
            fail("data.seq_len", f"is {d.seq_len}; it must be at least 2")
        for name in ("input_len", "target_len", "mixture_cap", "tokenizer_sentences"):
            if getattr(d, name) < 1:
                fail(f"data.{name}", f"is {getattr(d, name)}; it must be at least 1")
        if not (math.isfinite(d.corpus_shard_mb) and d.corpus_shard_mb > 0):
            fail("data.corpus_shard_mb", f"is {d.corpus_shard_mb}; it must be a positive number of MiB")
        if d.templates_per_dataset < 0:
            fail("data.templates_per_dataset", f"is {d.templates_per_dataset}; use 0 (all) or a positive count")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(e, name) < 1:
                fail(f"eval.{name}", f"is {getattr(e, name)}; it must be at least 1")
        for name in ("limit", "few_shot"):
            if getattr(e, name) < 0:
                fail(f"eval.{name}", f"is {getattr(e, name)}; it must be 0 or more")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problem(m: ModelConfig, tp: int, pp: int = 1, virtual: int = 1) -> tuple[str, str] | None:
    """Why this model cannot be split tp x pp x virtual ways, as (field, message), or None when it can.

    Tensor parallelism gives each rank whole query and key/value heads and equal slices of d_ff and of the
    vocabulary; every pipeline stage (pp x virtual of them) needs a layer. The one home of these rules:
    validate(), apply_tensor_parallel, the planner and `flan checkpoint convert` all ask here.
    """
    for name in ("n_heads", "n_kv_heads", "d_ff", "vocab_size"):
        size = getattr(m, name)
        if size % tp:
            return "parallel.tp", f"{tp} does not divide model.{name}={size}; choose tp among {_divisors(size)}"
    if m.n_layers < pp * virtual:
        return "parallel.pp", (f"pp x virtual_stages = {pp * virtual} exceeds model.n_layers={m.n_layers}; every "
                               "stage needs at least one layer")
    return None


def batch_problem(t: TrainConfig, p: ParallelConfig, dp: int) -> tuple[str, str] | None:
    """Why train.batch_size cannot be split over `dp` replicas (and, under a pipeline, into grad_accum rounds
    of parallel.microbatches equal microbatches), as (field, message), or None when it can. validate() asks
    with an explicit parallel.dp, init_mesh with the degree the world size gives."""
    if t.batch_size % dp:
        return "train.batch_size", (f"{t.batch_size} rows do not split over parallel.dp={dp} replicas; choose a "
                                    f"multiple of {dp}")
    if p.pp > 1:
        unit = dp * t.grad_accum * p.microbatches
        if t.batch_size % unit:
            return "parallel.microbatches", (
                f"train.batch_size={t.batch_size} does not split into dp={dp} x train.grad_accum={t.grad_accum} x "
                f"parallel.microbatches={p.microbatches} equal microbatches; choose a batch size that is a "
                f"multiple of {unit}, or fewer microbatches")
    return None


AUTO_FIELDS = (("train", "device"), ("train", "precision"), ("model", "attention"), ("model", "loss"))
"""The choices that may be "auto" in a config file and that `resolve_auto` makes."""


def unresolved(cfg: Config) -> list[str]:
    """The fields of `cfg` still set to "auto" (empty once resolve_auto has run)."""
    return [f"{section}.{name}" for section, name in AUTO_FIELDS if getattr(getattr(cfg, section), name) == "auto"]


def resolve_auto(cfg: Config, cuda_available: bool | None = None) -> Config:
    """A copy of `cfg` with every "auto" choice made for the device this process runs on. The one home of
    these rules (the training loop calls it once, before anything is built):

        train.device     cuda when torch sees a GPU, else cpu
        train.precision  bf16 autocast on cuda, fp32 on cpu
        model.attention  triton (the flash kernel) on cuda, torch on cpu
        model.loss       fused (the output projection + cross-entropy kernel) on cuda, torch on cpu

and refuses model.attention_tiles = tma on a GPU older than sm_90.

    Checkpoints keep the configuration as written, so a run trained on GPUs still resolves to the CPU paths
    when loaded on a CPU. `cuda_available` overrides torch's answer (tests).
    """
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    out = copy.deepcopy(cfg)
    t, m = out.train, out.model
    if t.device == "cuda" and not cuda_available:
        raise ConfigError("train.device: cuda, but torch sees no CUDA device; use --train.device=cpu (or auto)")
    if t.device == "auto":
        t.device = "cuda" if cuda_available else "cpu"
    gpu = t.device == "cuda"
    if t.precision == "auto":
        t.precision = "bf16" if gpu else "fp32"
    if m.attention == "auto":
        m.attention = "triton" if gpu else "torch"
    if m.loss == "auto":
        m.loss = "fused" if gpu else "torch"
    if m.attention == "triton" and m.attention_tiles == "tma" and gpu and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major < 9:
            raise ConfigError(f"model.attention_tiles: tma needs sm_90 (Hopper) or newer; this GPU is "
                              f"sm_{major}{minor}. Use --model.attention_tiles=pointers")
    return out


SECTIONS: dict[str, type] = typing.get_type_hints(Config)
KERNEL_FIELDS = ("attention", "attention_tiles", "attention_backward", "loss")
"""The [model] fields that choose kernels, not the model's shape or weights: a run from a checkpoint keeps the
checkpoint's shape and takes these from its own config."""


def with_kernels(shape: ModelConfig, kernels: ModelConfig) -> ModelConfig:
    """`shape` with the KERNEL_FIELDS of `kernels`."""
    return dataclasses.replace(shape, **{name: getattr(kernels, name) for name in KERNEL_FIELDS})


def _coerce(value: Any, typ: Any, where: str, from_flag: bool) -> Any:
    """Check a TOML (or checkpoint JSON) value's type exactly, or convert a command-line string, to the field
    type `typ`: in a file, "5" is not a number, "true" not a boolean and true not the choice 1."""
    from_flag = from_flag and isinstance(value, str) and typ is not str
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        for c in choices:
            if (value == c and type(value) is type(c)) or (
                    isinstance(value, str) and (from_flag or isinstance(c, str)) and str(c).lower() == value.lower()):
                return c
        mistyped = not from_flag and all(type(value) is not type(c) for c in choices)
        raise ConfigError(f"{where}: {value!r} is not accepted; choose one of {', '.join(map(repr, choices))}"
                          + (" (numbers and booleans unquoted, words quoted)" if mistyped else ""))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_flag and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: {value!r} is not a boolean; write true or false" +
                          ("" if from_flag else " without quotes"))
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_flag:
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: {value!r} is not an integer" + ("" if from_flag or not isinstance(value, str)
                                                                      else "; write it without quotes"))
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_flag:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a number" + ("" if from_flag or not isinstance(value, str)
                                                                    else "; write it without quotes"))
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {value!r} is not a string; quote it in TOML")
    raise TypeError(f"unsupported config field type {typ}")


def _apply(cfg: Config, section: str, key: str, value: Any, where: str, from_flag: bool = False) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section [{section}]; known sections: {', '.join(SECTIONS)}")
    sec = getattr(cfg, section)
    hints = typing.get_type_hints(type(sec))
    if key not in hints:
        raise ConfigError(f"{where}: unknown field {section}.{key}; fields of [{section}]: {', '.join(hints)}")
    setattr(sec, key, _coerce(value, hints[key], f"{where}: {section}.{key}", from_flag))


def parse_overrides(args: list[str]) -> list[tuple[str, str, str]]:
    """`--section.field=value` flags to (section, field, value) triples."""
    out = []
    for a in args:
        if not a.startswith("--") or "=" not in a or "." not in a.split("=", 1)[0]:
            raise ConfigError(f"flag {a!r}: overrides are written --section.field=value, e.g. --train.steps=10")
        k, v = a[2:].split("=", 1)
        section, key = k.split(".", 1)
        out.append((section, key, v))
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then the flags; validated before it is returned."""
    cfg = Config()
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found; presets live in configs/ (e.g. configs/tiny.toml)")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        if not data:
            raise ConfigError(f"{path}: holds no settings (empty or only comments); start from a preset such as "
                              "configs/tiny.toml")
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table; "
                                  f"known sections: {', '.join(SECTIONS)}")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(path))
    for section, key, value in parse_overrides(overrides or []):
        _apply(cfg, section, key, value, f"flag --{section}.{key}", from_flag=True)
    if overrides:
        source += " + flags " + " ".join(overrides)
    return cfg.validate(source)


def config_from_dict(data: dict[str, Any], source: str = "checkpoint") -> Config:
    """Rebuild a Config saved with Config.to_dict() (checkpoints store it as JSON)."""
    cfg = Config()
    for section, table in data.items():
        for key, value in table.items():
            _apply(cfg, section, key, value, source)
    return cfg.validate(source)
