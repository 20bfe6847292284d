"""config.json <-> our ModelConfig, and tensor names ours <-> HF Llama's.

Our block is HF Llama's: RMSNorm (weight * x / rms), rotary embeddings in the "halves" layout (rotate_half),
grouped-query attention without biases, a gated MLP down(act(gate(x)) * up(x)). So the weights map one to one
by name and no tensor is permuted; a GELU-gated model (LaMDA-PT) exports with hidden_act="gelu_pytorch_tanh".
Accepted on import: model_type llama, and mistral without a sliding window (the same computation); RoPE
plain, "linear" or "llama3" scaled. Anything else is refused by name.
"""
from __future__ import annotations

from pathlib import Path

from engine.config import Config, ModelConfig
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
MODEL_TYPES = ("llama", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")


class HFError(FlanError, ValueError):
    """A folder or checkpoint that cannot be converted; the message names the file and the reason."""


def hf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, index, rest = name.split(".", 2)  # "layers.<i>.<rest>"
    return f"model.layers.{index}.{LAYER_NAMES[rest]}"


def our_name(name: str, where: Path) -> str | None:
    """Our name for an HF tensor; None for rotary buffers (recomputed from the config)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    for ours, theirs in TOP_NAMES.items():
        if name == theirs:
            return ours
    parts = name.split(".", 3)  # "model.layers.<i>.<rest>"
    if len(parts) == 4 and parts[:2] == ["model", "layers"]:
        for ours, theirs in LAYER_NAMES.items():
            if parts[3] == theirs:
                return f"layers.{parts[2]}.{ours}"
    raise HFError(f"{where}: tensor {name!r} has no counterpart in our Llama-style model "
                  "(biases or other architectures are not supported)")


def llama_config(cfg: Config, tokenizer) -> dict:
    """config.json for transformers' LlamaForCausalLM with our model's shape."""
    m = cfg.model
    rope = {"rope_type": "default" if m.rope_scaling == "none" else m.rope_scaling, "rope_theta": m.rope_theta}
    if m.rope_scaling != "none":
        rope["factor"] = m.rope_factor
    if m.rope_scaling == "llama3":
        rope.update(low_freq_factor=m.rope_low_freq_factor, high_freq_factor=m.rope_high_freq_factor,
                    original_max_position_embeddings=m.rope_original_max_len)
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
        "rope_parameters": rope,
        # Rotary embeddings extrapolate; this only bounds what HF tools assume about the context.
        "max_position_embeddings": max(2048, cfg.data.seq_len, cfg.data.input_len + cfg.data.target_len,
                                       m.rope_original_max_len if m.rope_scaling == "llama3" else 0),
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
    kind = d.get("model_type")
    if kind not in MODEL_TYPES:
        raise HFError(f"{where}: model_type is {kind!r}; only Llama-architecture models import "
                      f"({', '.join(MODEL_TYPES)})")
    if kind == "mistral" and d.get("sliding_window") is not None:
        raise HFError(f"{where}: sliding_window={d['sliding_window']}; our attention is full causal, so only "
                      "Mistral models without a sliding window (sliding_window null) import")
    act = d.get("hidden_act", "silu")
    mlp = {v: k for k, v in ACTIVATIONS.items()}.get(act)
    if mlp is None:
        raise HFError(f"{where}: hidden_act={act!r}; supported: {', '.join(ACTIVATIONS.values())}")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise HFError(f"{where}: rope scaling {rope_type!r} is not implemented; supported: {', '.join(ROPE_TYPES)}")
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise HFError(f"{where}: {flag}=true; our model has no biases")
    n_heads = d["num_attention_heads"]
    scaling = {}
    if rope_type != "default":
        scaling = dict(rope_scaling=rope_type, rope_factor=float(rope.get("factor", 1.0)))
    if rope_type == "llama3":
        scaling.update(rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                       rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                       rope_original_max_len=int(rope.get("original_max_position_embeddings", 8192)))
    return ModelConfig(
        vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // n_heads, d_ff=d["intermediate_size"], mlp=mlp,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)), **scaling,
    )
