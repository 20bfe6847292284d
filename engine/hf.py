"""Hugging Face interop: our checkpoints as Llama-format folders and back.

    flan export-hf runs/tiny/checkpoints/step-000400 runs/tiny/hf   # config.json, model.safetensors, tokenizer
    flan import-hf path/to/llama-folder runs/llama                   # -> runs/llama/checkpoints/step-000000
    flan tune runs/llama/config.toml --train.init_from=runs/llama     #    and runs/llama/config.toml to tune it

Our block is HF Llama's: RMSNorm (weight * x / rms), rotary embeddings in the "halves" layout (rotate_half),
grouped-query attention without biases, a gated MLP down(act(gate(x)) * up(x)). So the weights map one to one
by name and no tensor is permuted; a GELU-gated model (LaMDA-PT) exports with hidden_act="gelu_pytorch_tanh".

The tokenizer is exported as a `tokenizers` Unigram model built from the SentencePiece file's pieces and
scores, with SentencePiece's own normalisation (its precompiled NFKC map, whitespace trimmed and collapsed,
a "▁" prefix) and byte fallback, so that `AutoTokenizer` on the folder encodes text to our ids;
`check_tokenizer` measures that on sample texts.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import dedup_tied, load_meta, load_model_state, save_weights
from engine.config import Config, ModelConfig, config_from_dict
from engine.errors import FlanError

# Per-layer parameter names: ours -> HF Llama's (under "model.layers.<i>.").
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}


class HFError(FlanError, ValueError):
    """A folder or checkpoint that cannot be converted; the message names the file and the reason."""


def hf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, index, rest = name.split(".", 2)  # "layers.<i>.<rest>"
    return f"model.layers.{index}.{LAYER_NAMES[rest]}"


def our_name(name: str, where: Path) -> str:
    for ours, theirs in TOP_NAMES.items():
        if name == theirs:
            return ours
    parts = name.split(".", 3)  # "model.layers.<i>.<rest>"
    if len(parts) == 4 and parts[:2] == ["model", "layers"]:
        for ours, theirs in LAYER_NAMES.items():
            if parts[3] == theirs:
                return f"layers.{parts[2]}.{ours}"
    raise HFError(f"{where}: tensor {name!r} has no counterpart in our Llama-style model "
                  "(biases, rotary buffers or other architectures are not supported)")


def llama_config(cfg: Config, tokenizer) -> dict:
    """config.json for transformers' LlamaForCausalLM with our model's shape."""
    m = cfg.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": ACTIVATIONS[m.mlp],
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        # Rotary embeddings extrapolate; this only bounds what HF tools assume about the context.
        "max_position_embeddings": max(2048, cfg.data.seq_len, cfg.data.input_len + cfg.data.target_len),
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
        "initializer_range": m.init_std,
    }


def model_config_from_llama(d: dict, where: Path) -> ModelConfig:
    """Our ModelConfig for an HF Llama config.json; anything we do not implement is refused by name."""
    if d.get("model_type") != "llama":
        raise HFError(f"{where}: model_type is {d.get('model_type')!r}; only Llama-architecture models import")
    act = d.get("hidden_act", "silu")
    mlp = {v: k for k, v in ACTIVATIONS.items()}.get(act)
    if mlp is None:
        raise HFError(f"{where}: hidden_act={act!r}; supported: {', '.join(ACTIVATIONS.values())}")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFError(f"{where}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not implemented; "
                      "only plain rotary embeddings import")
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise HFError(f"{where}: {flag}=true; our model has no biases")
    n_heads = d["num_attention_heads"]
    return ModelConfig(
        vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // n_heads, d_ff=d["intermediate_size"], mlp=mlp,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
    )


def hf_tokenizer(sp_model: Path):
    """A transformers fast tokenizer that encodes like our SentencePiece model (Unigram, byte fallback)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(sp_model).read_bytes())
    if proto.trainer_spec.model_type != 1:
        raise HFError(f"{sp_model}: only unigram SentencePiece models export (this one has model_type "
                      f"{proto.trainer_spec.model_type})")
    spec = proto.normalizer_spec
    unk = next(i for i, p in enumerate(proto.pieces) if p.type == 2)
    tok = Tokenizer(Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=unk,
                            byte_fallback=proto.trainer_spec.byte_fallback))
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:  # SentencePiece trims both ends and collapses runs of spaces
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(steps)
    # Split at spaces and prefix every word with "▁": no piece spans a word boundary, so Viterbi over the
    # words equals SentencePiece's Viterbi over the whole text.
    scheme = "always" if spec.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1 if spec.add_dummy_prefix else 0)])
    special = {p.type: p.piece for p in proto.pieces if p.type in (2, 3)}
    controls = [p.piece for p in proto.pieces if p.type == 3]
    by_id = [p.piece for p in proto.pieces]
    ids = {"pad": proto.trainer_spec.pad_id, "bos": proto.trainer_spec.bos_id, "eos": proto.trainer_spec.eos_id}
    names = {k: by_id[i] if 0 <= i < len(by_id) else None for k, i in ids.items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=special[2], bos_token=names["bos"], eos_token=names["eos"],
        pad_token=names["pad"], additional_special_tokens=[c for c in controls if c not in names.values()],
        add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False)


def check_tokenizer(hf_tok, tokenizer, texts: list[str]) -> list[str]:
    """Texts on which the exported tokenizer's ids differ from ours (empty when they all agree)."""
    return [t for t in texts if hf_tok.encode(t, add_special_tokens=False) != tokenizer.encode(t)]


def export_hf(step_dir: str | Path, out: str | Path) -> Path:
    """Write `out` as a Llama-format folder (config, safetensors weights, tokenizer) from a checkpoint folder."""
    from engine.tokenizer import load_tokenizer

    step_dir, out = Path(step_dir), Path(out)
    cfg = config_from_dict(load_meta(step_dir)["config"], f"{step_dir} (its stored config)")
    state = load_model_state(step_dir)
    tokenizer = load_tokenizer(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {hf_name(k): v.float().contiguous() for k, v in dedup_tied(state).items()
               if not (cfg.model.tie_embeddings and k == "output.weight")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(llama_config(cfg, tokenizer), indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}))
    hf_tokenizer(tokenizer.path).save_pretrained(str(out))
    shutil.copyfile(tokenizer.path, out / "tokenizer.model")  # lets `flan import-hf` bring it back exactly
    return out


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise HFError(f"{folder}: neither model.safetensors nor model.safetensors.index.json found; "
                      "save the model with safe_serialization=True (pickled .bin weights are not read)")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        out.update(load_file(str(folder / shard)))
    return out


def _check_shapes(model_cfg: ModelConfig, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Every tensor our model needs is there with its shape (checked on the meta device: nothing allocated)."""
    from engine.model import Transformer

    with torch.device("meta"):
        wanted = Transformer(model_cfg).state_dict()
    if model_cfg.tie_embeddings:
        wanted.pop("output.weight")
    for name, t in wanted.items():
        if name not in state:
            raise HFError(f"{folder}: tensor {hf_name(name)!r} is missing from the weights")
        if tuple(state[name].shape) != tuple(t.shape):
            raise HFError(f"{folder}: tensor {hf_name(name)!r} has shape {tuple(state[name].shape)}, but "
                          f"config.json implies {tuple(t.shape)}")


def import_hf(folder: str | Path, run_dir: str | Path) -> Path:
    """Bring a Llama-architecture HF folder in as <run_dir>/checkpoints/step-000000 (fp32 weights)."""
    folder, run_dir = Path(folder), Path(run_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HFError(f"{config_path}: not found; point import-hf at a transformers model folder")
    model_cfg = model_config_from_llama(json.loads(config_path.read_text()), config_path)
    state = {}
    for name, tensor in _read_weights(folder).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer recomputed from rope_theta
        state[our_name(name, folder)] = tensor.float()
    if model_cfg.tie_embeddings:
        state.pop("output.weight", None)
    elif "output.weight" not in state:
        raise HFError(f"{folder}: lm_head.weight is missing and tie_word_embeddings is false")
    _check_shapes(model_cfg, state, folder)
    sp_model = folder / "tokenizer.model"
    if not sp_model.is_file():
        raise HFError(f"{folder}: no tokenizer.model; our engine tokenizes with SentencePiece, so import-hf "
                      "needs the model's SentencePiece file beside its weights")
    cfg = Config(model=model_cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sp_model, run_dir / "tokenizer.model")
    cfg.data.tokenizer = str((run_dir / "tokenizer.model").resolve())
    cfg.train.run_dir = str(run_dir / "tuned")
    cfg.validate(str(config_path))
    (run_dir / "config.toml").write_text(config_toml(cfg, f"imported by `flan import-hf` from {folder}"))
    return save_weights(run_dir, 0, state, {"config": cfg.to_dict(), "imported_from": str(folder)}, keep=1)


def config_toml(cfg: Config, comment: str) -> str:
    """A TOML preset reproducing `cfg` (every section and field), for tuning an imported model."""
    def value(v) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    lines = [f"# {comment}"]
    for section, table in cfg.to_dict().items():
        lines += ["", f"[{section}]"] + [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
