"""Memory per GPU and step time of a parallel layout, computed (never allocated) from the config.

    plans = enumerate_plans(cfg, gpus=256, hardware=H100_80G)     # every dp x pp x tp x schedule x ... candidate
    best = [p for p in plans if p.fits][0]                         # sorted by estimated step time

The figures describe THIS engine (engine/model.py under engine/parallel), term by term, so that the tiny
model's real CPU allocation checks them (tests/engine/test_planner.py). Notation: s sequence length, b rows
per microbatch, n = s b tokens, h d_model, a query heads, k key/value heads, d head_dim, f d_ff, V vocabulary,
L layers, t tp, p pp, v virtual stages, m microbatches per step, e bytes per activation element.

Parameters, gradients, optimizer state (ZeRO paper's accounting, Rajbhandari et al. 2020):
    mixed bf16 (GPU)  weights 2 + gradients 2 + fp32 master 4 bytes per parameter, plus the optimizer state:
                      AdamW m and v 4 + 4 (16 B/param in all), Adafactor's factored second moment r + c fp32
                      per (r, c) matrix and n per vector (no first moment, as torch.optim.Adafactor and FLAN).
    fp32 (CPU)        weights 4 + gradients 4, no master copy; the same optimizer state.
(Today's loop keeps fp32 weights under bf16 autocast: 4 + 4 + the state, the same total per parameter as the
mixed accounting, split differently, plus the bf16 cast copies below; ZeRO-1 then divides the optimizer state
only.)
ZeRO-1 divides the master weights and the optimizer state by dp (offered with AdamW only: the engine's ZeRO-1
shards elementwise state, and Adafactor's factors are not). Under tensor parallelism the block matrices
and the vocabulary are split t ways (TP_PLAN in engine/parallel/tensor.py decides which), norms are replicated.
A pipeline rank holds ceil(L / (p v)) layers per chunk and v chunks (an even split: the engine's split weighs the
head too and may move a layer or two off the last stage); the first also holds the embedding, the last the final
norm and the head (a copy of the tied embedding when p > 1, as Megatron-LM keeps).

Activations saved for backward, per layer and microbatch. Korthikanti et al. 2022 count sbh(34 + 5as/h) bytes
for GPT (LayerNorm, GeLU MLP of 4h, dropout, unfused attention). Re-derived for this block (RMSNorm, RoPE, GQA,
head_dim independent of h/a, gated MLP of width f, no dropout), from what autograd keeps (q = t under sequence
parallelism, else 1):
    2 RMSNorms      input n h/q, normalised x n h/q (kept for the gain's gradient), 1/rms n/q, all fp32 (the
                    residual stream is fp32; under autocast the norm hands one bf16 copy to its linears)
    2 linear inputs the norm outputs n h: full size on every rank, since the all-gather of sequence
                    parallelism is kept (Megatron re-gathers it in backward to keep n h/t; this engine does not)
    attention       q and its output n a d/t, k and v n k d/t each, log-sum-exp n a/t fp32 (the flash kernel);
                    the PyTorch path adds the masked output copy n a d/t, the padding mask n and the additive
                    segment mask b s^2 (its s^2 term is Korthikanti's 5as/h, here without a softmax copy)
    gated MLP       gate pre-activation, its activation, up, and their product: 4 n f/t
Activations are counted at e bytes (bf16 on GPU) except the fp32 norm terms. Under bf16 the step also keeps one
bf16 copy of every weight of the rank (autocast's cast cache, shared by the step's microbatches), 2 B/param,
counted with the activations.
Recomputation (parallel.recompute): "full" keeps only the block input n h/q (fp32) per layer, "selective" also the
matmul outputs n(a + 2k)d/t + 2 n f/t + 2 n h (and with sequence parallelism the all-gathered norm outputs 2 n h
and reduce-scattered block outputs 2 n h/q); both rebuild one layer at a time in backward. "full" costs one more
forward of the blocks and re-runs their collectives; "selective" only cheap elementwise work and attention.
Per microbatch the first stage adds the rotary tables (2 n d/2 fp32) and the token ids (n int64); the last adds
the final norm (as above) and the loss: PyTorch's log-softmax (n V/t fp32), the Triton kernel's logits-sized
gradient (n V/t e), or the fused kernel's hidden and weight gradients (n h e + V h/t fp32).
In flight on a pipeline rank (counted in layer chunks): GPipe m microbatches; 1F1B min(p - r, m) on rank r;
interleaved 2(p - 1 - r) + (v - 1) p + 1 chunk-microbatches (Megatron-LM's warm-up plus one), at most m v.
Each chunk-microbatch in flight also keeps its output, n h/q fp32, in the pipeline runner until its backward.
Beside the activations at the peak (transient_bytes, measured against `flan memory`'s dry run): under bf16 the
bf16 gradients of a chunk's weight casts (its layers' parameters at e bytes, alive until the chunk's backward
ends), or, whichever is larger, at the end of backward the data-parallel buckets (one fp32 copy of the rank's
gradients but the tied embedding's) when dp > 1.

Step time: the FLOPs of engine.info.training_flops_per_token (plus one more forward with recomputation) shared
by the N GPUs at `efficiency` x peak; tensor-parallel collectives (4 per layer and microbatch, 6 with
recomputation, of n h e bytes over NVLink with ring traffic 2(t-1)/t) added to the compute; the pipeline bubble
(p - 1)/(v m) stretching both; pipeline sends (2 m v of n h e / q bytes); the data-parallel gradient all-reduce
(or ZeRO-1's reduce-scatter + all-gather, the same ring volume) of the rank's gradients, over the inter-node
links when the group spans nodes, exposed for the fraction not overlapped. MFU counts the model's FLOPs only.
Not modelled: small-microbatch GEMM efficiency, stage imbalance from the head, allocator fragmentation (the
`reserve` fraction of memory stands for it, with the CUDA context and NCCL's own buffers), and the pipeline
sends that gloo, answering one work per operation, keeps until the step's end (NCCL's coalesced batch is
waited for at once; engine/memory.py's coalesced_p2p).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from engine.config import Config, layout_problem
from engine.info import meta_model, training_flops_per_token
from engine.parallel.recompute import MODES as RECOMPUTE_MODES
from engine.parallel.tensor import planned_shard_dim

GiB = 1024 ** 3


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of training state; one set of formulas serves GPU and CPU."""

    name: str
    weight_bytes: int
    grad_bytes: int
    master_bytes: int
    """fp32 master copy of the weights kept by the optimizer (0 when the weights are fp32 already)."""
    state_bytes: int
    """Optimizer-state element (AdamW m, v; Adafactor's factors)."""
    activation_bytes: int
    attention: str
    """"flash" (the Triton kernel) or "torch" (the PyTorch path with an explicit segment mask)."""
    loss: str
    """"fused" (no logits; tp = 1 on GPU), "triton" (logits-sized gradient) or "torch" (fp32 log-softmax)."""


BF16_MIXED = Precision("bf16-mixed", 2, 2, 4, 4, 2, attention="flash", loss="fused")
BF16_TORCH_PATHS = Precision("bf16-mixed-torch-paths", 2, 2, 4, 4, 2, attention="torch", loss="torch")
"""What `flan memory` measures until the Triton kernels have fake implementations."""
FP32_CPU = Precision("fp32-cpu", 4, 4, 0, 4, 4, attention="torch", loss="torch")


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float
    peak_flops: float
    """Dense bf16 tensor-core FLOP/s of one GPU."""
    efficiency: float
    """Fraction of peak the model's kernels reach without communication or bubble."""
    gpus_per_node: int
    intra_node_bw: float
    """Bytes/s one GPU sends to its node peers (NVLink, one direction)."""
    inter_node_bw: float
    """Bytes/s one GPU sends across nodes (its share of the node's network)."""
    reserve: float = 0.1
    """Memory fraction kept free for the CUDA context, communication buffers and fragmentation."""
    dp_overlap: float = 0.0
    """Fraction of the data-parallel all-reduce hidden behind backward (0: all exposed, the cautious view)."""


# H100 SXM: 989 TFLOP/s dense bf16, NVLink 4 at 450 GB/s each way, one 400 Gb/s NIC per GPU (DGX H100).
H100_80G = Hardware("H100-SXM-80GiB", 80 * GiB, 989e12, 0.6, 8, 450e9, 50e9)
# A100 SXM: 312 TFLOP/s dense bf16, NVLink 3 at 300 GB/s each way, one 200 Gb/s NIC per GPU (DGX A100).
A100_80G = Hardware("A100-SXM-80GiB", 80 * GiB, 312e12, 0.6, 8, 300e9, 25e9)
HARDWARE = {"h100": H100_80G, "a100": A100_80G}


@dataclass(frozen=True)
class Layout:
    dp: int
    pp: int
    tp: int
    microbatches: int
    schedule: str = "none"
    virtual_stages: int = 1
    zero: int = 0
    recompute: str = "none"
    """parallel.recompute: "none", "selective" or "full" (engine/parallel/recompute.py)."""
    sp: bool = False

    def label(self) -> str:
        return f"dp{self.dp} pp{self.pp} tp{self.tp}"


@dataclass
class Plan:
    layout: Layout
    microbatch_rows: int
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    """Master weights and optimizer state (divided by dp under ZeRO-1)."""
    activations_bytes: float
    total_bytes: float
    step_s: float
    mfu: float
    fits: bool
    time_parts: dict

    def to_dict(self) -> dict:
        return dict(asdict(self), layout=asdict(self.layout))


# ---- parameters ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankParameters:
    elements: int
    """Parameters this rank holds (its tp slices, its stage's layers)."""
    adafactor_state: int
    """Elements of Adafactor's factored second moment for those slices."""


def _local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    dim = planned_shard_dim(name)
    if dim is None or tp == 1:
        return shape
    return tuple(n // tp if i == dim else n for i, n in enumerate(shape))


def _adafactor_elements(shape: tuple[int, ...]) -> int:
    return shape[0] + shape[1] if len(shape) == 2 else math.prod(shape)


def _count(shapes: list[tuple[int, ...]]) -> RankParameters:
    return RankParameters(sum(math.prod(s) for s in shapes), sum(_adafactor_elements(s) for s in shapes))


@dataclass(frozen=True)
class ModelShapes:
    """Global parameter shapes by role, read once from the meta-device model."""

    layer: tuple[tuple[str, tuple[int, ...]], ...]
    """One block's parameters (every block has the same)."""
    embedding: tuple[tuple[str, tuple[int, ...]], ...]
    final: tuple[tuple[str, tuple[int, ...]], ...]
    """The final norm, and the head when it is untied."""


def model_shapes(cfg: Config) -> ModelShapes:
    layer, embedding, final = [], [], []
    for name, p in meta_model(cfg).named_parameters():  # the tied head is listed once, as the embedding
        role = layer if name.startswith("layers.0.") else embedding if name.startswith("tok_embeddings.") else (
            None if name.startswith("layers.") else final)
        if role is not None:
            role.append((name, tuple(p.shape)))
    return ModelShapes(tuple(layer), tuple(embedding), tuple(final))


def rank_parameters(cfg: Config, layout: Layout, shapes: ModelShapes) -> dict[str, RankParameters]:
    """Parameters held by the first and the last pipeline rank (the same rank when pp = 1)."""
    def local(group):
        return [_local_shape(name, shape, layout.tp) for name, shape in group]

    layer, embedding, final = local(shapes.layer), local(shapes.embedding), local(shapes.final)
    head = embedding if cfg.model.tie_embeddings and layout.pp > 1 else []
    blocks = layer * (layers_per_chunk(cfg, layout) * layout.virtual_stages)
    if layout.pp == 1:
        whole = _count(embedding + blocks + final)
        return {"first": whole, "last": whole}
    return {"first": _count(embedding + blocks), "last": _count(blocks + final + head)}


def layers_per_chunk(cfg: Config, layout: Layout) -> int:
    return -(-cfg.model.n_layers // (layout.pp * layout.virtual_stages))


def state_bytes(cfg: Config, layout: Layout, params: RankParameters, precision: Precision) -> dict[str, float]:
    optimizer_elements = 2 * params.elements if cfg.optim.name == "adamw" else params.adafactor_state
    sharded = params.elements * precision.master_bytes + optimizer_elements * precision.state_bytes
    return {"weights": params.elements * precision.weight_bytes,
            "grads": params.elements * precision.grad_bytes,
            "optimizer": sharded / (layout.dp if layout.zero else 1)}


# ---- activations --------------------------------------------------------------------------------------------
def layer_activation_bytes(cfg: Config, layout: Layout, rows: int, precision: Precision) -> float:
    """Bytes one block keeps for its backward, for one microbatch of `rows` rows, without recomputation."""
    m, t, e = cfg.model, layout.tp, precision.activation_bytes
    s = cfg.data.seq_len
    n = rows * s
    q = t if layout.sp else 1
    norms = 2 * (2 * n * m.d_model / q * 4 + n / q * 4)  # the residual stream and the norm math are fp32
    linear_inputs = 2 * n * m.d_model * e
    attention = (2 * n * m.n_heads * m.head_dim + 2 * n * m.n_kv_heads * m.head_dim) / t * e + n * m.n_heads / t * 4
    if precision.attention == "torch":
        attention += n * m.n_heads * m.head_dim / t * e + n * e + rows * s * s * e
    mlp = 4 * n * m.d_ff / t * e
    return norms + linear_inputs + attention + mlp


def recompute_layer_bytes(cfg: Config, layout: Layout, rows: int, precision: Precision) -> float:
    """Bytes one block keeps under recomputation: its input under "full"; under "selective" also its matmul
    outputs (q, k, v, the attention output projection, gate, up, down: the projections before their
    reduction are full-sequence partial sums) and, with sequence parallelism, the all-gathered norm outputs
    and the reduce-scattered block outputs (collectives are kept, never re-run)."""
    m, t, e = cfg.model, layout.tp, precision.activation_bytes
    n = rows * cfg.data.seq_len
    q = t if layout.sp else 1
    kept = n * m.d_model / q * 4  # the block input: the fp32 residual stream
    if layout.recompute == "selective":
        kept += (n * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim / t + 2 * n * m.d_ff / t + 2 * n * m.d_model) * e
        if layout.sp and t > 1:
            kept += (2 * n * m.d_model + 2 * n * m.d_model / q) * e
    return kept


def edge_activation_bytes(cfg: Config, layout: Layout, rows: int, precision: Precision) -> dict[str, float]:
    """Per microbatch: what the first stage keeps before the blocks and the last stage after them."""
    m, t, e = cfg.model, layout.tp, precision.activation_bytes
    n = rows * cfg.data.seq_len
    q = t if layout.sp else 1
    first = 2 * n * (m.head_dim // 2) * 4 + n * 8  # rotary cos and sin, token ids
    final_norm = 2 * n * m.d_model / q * 4 + n / q * 4 + n * m.d_model * e
    loss = precision.loss if not (precision.loss == "fused" and t > 1) else "triton"  # the fused kernel is tp=1 only
    if loss == "torch":
        head = n * m.vocab_size / t * 4
    elif loss == "triton":
        head = n * m.vocab_size / t * e
    else:
        head = n * m.d_model * e + m.vocab_size * m.d_model / t * 4
    return {"first": first, "last": final_norm + head}


def in_flight(layout: Layout, stage: str | int) -> int:
    """Microbatches (in layer chunks) whose activations a pipeline rank ("first", "last" or its index) holds
    at its peak."""
    p, v, mb = layout.pp, layout.virtual_stages, layout.microbatches
    r = pipeline_rank(layout, stage)
    if layout.schedule in ("none",) or p == 1:
        return 1
    if layout.schedule == "gpipe":
        return mb
    if layout.schedule == "1f1b":
        return min(p - r, mb)
    return min(2 * (p - 1 - r) + (v - 1) * p + 1, mb * v)


def cast_bytes(params: RankParameters, precision: Precision) -> float:
    """The bf16 copy of every weight a mixed-precision step keeps (none when the weights are the compute dtype)."""
    return params.elements * precision.activation_bytes if precision.master_bytes else 0.0


GRADIENT_BYTES = 4
"""The engine accumulates fp32 gradients (its parameters' dtype) under either precision."""


def transient_bytes(cfg: Config, layout: Layout, rows: int, precision: Precision, pp_rank: int,
                    held: RankParameters, shapes: ModelShapes) -> float:
    """Bytes beside the training state at the rank's peak, the larger of two moments, plus autocast's weight
    copies (kept for the whole step):
    - in a backward of the steady state, the activations and the bf16 gradients of the chunk's weight casts:
      the casts are cached from the step's first microbatch, so in a later one's backward their nodes are the
      oldest and autograd runs them last, holding every weight gradient of the chunk (of one layer without
      pipelining) in bf16 until the chunk's backward ends;
    - at the end of the last backward, the data-parallel buckets (engine/parallel/data.py): a flat fp32 copy of
      the rank's gradients, each bucket from its launch until the reduction is waited for after backward (the
      tied embedding is reduced later, on its own)."""
    layer = _count([_local_shape(n, s, layout.tp) for n, s in shapes.layer]).elements
    chunk_layers = layers_per_chunk(cfg, layout) if layout.pp > 1 else 1
    cast_grads = chunk_layers * layer * precision.activation_bytes if precision.master_bytes else 0.0
    busy = activation_bytes(cfg, layout, rows, precision, pp_rank) + cast_grads
    tied = cfg.model.tie_embeddings and layout.pp > 1 and pp_rank in (0, layout.pp - 1)
    late = _count([_local_shape(n, s, layout.tp) for n, s in shapes.embedding]).elements if tied else 0
    buckets = (held.elements - late) * GRADIENT_BYTES if layout.dp > 1 else 0.0
    return cast_bytes(held, precision) + max(busy, buckets)


def pipeline_rank(layout: Layout, stage: str | int) -> int:
    return {"first": 0, "last": layout.pp - 1}.get(stage, stage)


def kept_activation_bytes(cfg: Config, layout: Layout, rows: int, precision: Precision, stage: str) -> float:
    """What a rank keeps for backward at its fullest point of the schedule (without the one block that
    recomputation rebuilds in backward)."""
    chunk_layers = layers_per_chunk(cfg, layout) if layout.pp > 1 else cfg.model.n_layers
    chunks = in_flight(layout, stage)
    if layout.recompute == "none":
        blocks = chunks * chunk_layers * layer_activation_bytes(cfg, layout, rows, precision)
    else:
        blocks = chunks * chunk_layers * recompute_layer_bytes(cfg, layout, rows, precision)
    edges = edge_activation_bytes(cfg, layout, rows, precision)
    # The first rank keeps its edge activations for each microbatch in flight; the last runs the head's
    # backward right after its forward (1F1B) or keeps every microbatch's (GPipe); middle ranks have none.
    r = pipeline_rank(layout, stage)
    edge_count = min(chunks, layout.microbatches) if r == 0 else (
        layout.microbatches if layout.schedule == "gpipe" else 1)
    edge = (edges["first"] + edges["last"] if layout.pp == 1 else edges["first"] if r == 0 else
            edges["last"] if r == layout.pp - 1 else 0.0)
    # The pipeline runner keeps each chunk's output (the fp32 residual stream, n h/q) until that chunk's
    # backward, beside the block inputs counted above; the last rank's final chunk returns a loss instead.
    q = layout.tp if layout.sp else 1
    outputs = (chunks - (r == layout.pp - 1)) * rows * cfg.data.seq_len * cfg.model.d_model / q * 4 \
        if layout.pp > 1 else 0.0
    return blocks + edge_count * edge + outputs


def activation_bytes(cfg: Config, layout: Layout, rows: int, precision: Precision, stage: str) -> float:
    """Activation bytes at a rank's peak: what it keeps, plus (with recomputation) the one block rebuilt in
    backward (under "selective" the part of it not kept)."""
    kept = kept_activation_bytes(cfg, layout, rows, precision, stage)
    if layout.recompute == "none":
        return kept
    full = layer_activation_bytes(cfg, layout, rows, precision)
    return kept + full - (recompute_layer_bytes(cfg, layout, rows, precision) if layout.recompute == "selective"
                          else 0.0)


# ---- time ---------------------------------------------------------------------------------------------------
def bubble_fraction(layout: Layout) -> float:
    if layout.pp == 1:
        return 0.0
    return (layout.pp - 1) / (layout.virtual_stages * layout.microbatches)


def step_time(cfg: Config, layout: Layout, rows: int, params: RankParameters, precision: Precision,
              hw: Hardware) -> dict[str, float]:
    """Seconds per optimizer step, by part."""
    gpus = layout.dp * layout.pp * layout.tp
    tokens = cfg.train.batch_size * cfg.data.seq_len
    flops = training_flops_per_token(cfg)
    model_flops = flops["total"] * tokens
    executed = model_flops
    if layout.recompute == "full":  # one more forward of the blocks (a third of their training FLOPs), not the head
        executed += (flops["total"] - 6 * cfg.model.vocab_size * cfg.model.d_model) / 3 * tokens
    compute = executed / (gpus * hw.peak_flops * hw.efficiency)
    e, t = precision.activation_bytes, layout.tp
    activation = rows * cfg.data.seq_len * cfg.model.d_model * e
    chunk_layers = layers_per_chunk(cfg, layout) * layout.virtual_stages if layout.pp > 1 else cfg.model.n_layers
    collectives = 6 if layout.recompute == "full" else 4  # selective keeps the collectives' outputs
    tp_comm = (chunk_layers * layout.microbatches * collectives * 2 * (t - 1) / t * activation / hw.intra_node_bw
               if t > 1 else 0.0)
    pipeline = (compute + tp_comm) * bubble_fraction(layout)
    pp_bw = hw.inter_node_bw if layout.tp * layout.pp > hw.gpus_per_node else hw.intra_node_bw
    q = t if layout.sp else 1
    pp_comm = (2 * layout.microbatches * layout.virtual_stages * activation / q / pp_bw) if layout.pp > 1 else 0.0
    d = layout.dp
    dp_bw = hw.inter_node_bw if gpus > hw.gpus_per_node else hw.intra_node_bw
    dp_comm = (2 * (d - 1) / d * params.elements * precision.grad_bytes / dp_bw * (1 - hw.dp_overlap)
               if d > 1 else 0.0)
    total = compute + tp_comm + pipeline + pp_comm + dp_comm
    return {"compute": compute, "tp_comm": tp_comm, "bubble": pipeline, "pp_comm": pp_comm, "dp_comm": dp_comm,
            "total": total, "mfu": model_flops / (total * gpus * hw.peak_flops)}


# ---- one layout and every layout ----------------------------------------------------------------------------
def plan(cfg: Config, layout: Layout, hw: Hardware, precision: Precision = BF16_MIXED,
         shapes: ModelShapes | None = None) -> Plan:
    """Memory of the busiest rank and the step time of one layout (`shapes`: model_shapes(cfg), if at hand)."""
    batch = cfg.train.batch_size
    if batch % (layout.dp * layout.microbatches):
        raise ValueError(f"planner: train.batch_size={batch} rows do not split into dp={layout.dp} x "
                         f"microbatches={layout.microbatches}; choose a batch size both divide")
    rows = batch // (layout.dp * layout.microbatches)
    shapes = shapes or model_shapes(cfg)
    params = rank_parameters(cfg, layout, shapes)
    ranks = {}
    for stage in ("first", "last"):
        states = state_bytes(cfg, layout, params[stage], precision)
        act = transient_bytes(cfg, layout, rows, precision, pipeline_rank(layout, stage), params[stage], shapes)
        ranks[stage] = (sum(states.values()) + act, states, act)
    total, states, act = max(ranks.values(), key=lambda r: r[0])
    heaviest = max(params.values(), key=lambda r: r.elements)
    times = step_time(cfg, layout, rows, heaviest, precision, hw)
    fits = total <= hw.memory_bytes * (1 - hw.reserve)
    return Plan(layout, rows, states["weights"], states["grads"], states["optimizer"], act, total,
                times["total"], times["mfu"], fits, times)


def config_layout(cfg: Config) -> Layout:
    """The planner's Layout of a config's own parallel section (dp 0 taken as 1)."""
    p = cfg.parallel
    pipelined = p.pp > 1
    return Layout(max(p.dp, 1), p.pp, p.tp, p.microbatches if pipelined else 1, p.schedule if pipelined else "none",
                  p.virtual_stages if pipelined else 1, p.zero, p.recompute, p.sp and p.tp > 1)


def rank_bytes(cfg: Config, layout: Layout, pp_rank: int, precision: Precision = BF16_MIXED) -> dict[str, float]:
    """The planned bytes of pipeline rank `pp_rank`: weights, grads, optimizer, activations and total."""
    rows = cfg.train.batch_size // (layout.dp * layout.microbatches)
    shapes = model_shapes(cfg)
    layer = [_local_shape(n, s, layout.tp) for n, s in shapes.layer]
    held = layer * (layers_per_chunk(cfg, layout) * layout.virtual_stages)
    if pp_rank == 0:
        held += [_local_shape(n, s, layout.tp) for n, s in shapes.embedding]
    if pp_rank == layout.pp - 1:
        held += [_local_shape(n, s, layout.tp) for n, s in shapes.final]
        if cfg.model.tie_embeddings and layout.pp > 1:
            held += [_local_shape(n, s, layout.tp) for n, s in shapes.embedding]
    out = state_bytes(cfg, layout, _count(held), precision)
    out["activations"] = transient_bytes(cfg, layout, rows, precision, pp_rank, _count(held), shapes)
    out["total"] = sum(out.values())
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: Config, gpus: int, gpus_per_node: int = 8) -> list[Layout]:
    """Every layout the engine accepts on `gpus` GPUs: tp within a node, pp up to the layer count."""
    m, batch = cfg.model, cfg.train.batch_size
    out = []
    for tp in _divisors(gpus):
        if tp > gpus_per_node or layout_problem(m, tp):
            continue
        sp_choices = (True,) if tp > 1 and cfg.data.seq_len % tp == 0 else (False,)
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            if layout_problem(m, tp, pp) or batch % dp:
                continue
            # ZeRO-1 here shards AdamW's elementwise state only (engine/parallel/data.py refuses Adafactor).
            zero_choices = (0, 1) if dp > 1 and cfg.optim.name == "adamw" else (0,)
            schedules = [("none", 1)] if pp == 1 else [("gpipe", 1), ("1f1b", 1)]
            if pp > 1 and not layout_problem(m, tp, pp, 2):
                schedules.append(("interleaved", 2))
            for schedule, v in schedules:
                for mb in _divisors(batch // dp):
                    if schedule == "interleaved" and mb % pp:
                        continue  # Megatron-LM's interleaved schedule needs m a multiple of p
                    for zero in zero_choices:
                        for recompute in RECOMPUTE_MODES:
                            out.append(Layout(dp, pp, tp, mb, schedule, v, zero, recompute, sp_choices[0]))
    return out


def enumerate_plans(cfg: Config, gpus: int, hw: Hardware = H100_80G,
                    precision: Precision = BF16_MIXED) -> list[Plan]:
    """Every candidate, fitting ones first, each group by step time (then memory)."""
    if gpus < 1:
        raise ValueError(f"planner: --gpus {gpus}; give at least one GPU")
    shapes = model_shapes(cfg)
    plans = [plan(cfg, layout, hw, precision, shapes) for layout in candidate_layouts(cfg, gpus, hw.gpus_per_node)]
    return sorted(plans, key=lambda p: (not p.fits, p.step_s, p.total_bytes))
