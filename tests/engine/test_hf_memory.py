"""Import streams: the peak resident memory (VmHWM) of the weight import, in a fresh process, stays under
twice the largest tensor (fp32) above what that process held after importing torch and the engine."""
import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import save_file

VOCAB, D = 8192, 1024  # the embedding, 32 MiB in fp32, is the largest tensor by far


def test_import_peak_memory_is_two_tensors(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    cfg = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": D, "intermediate_size": 64,
           "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128,
           "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(VOCAB, D, generator=g), "model.norm.weight": torch.ones(D)}
    for i in range(4):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": torch.ones(D),
                        p + "post_attention_layernorm.weight": torch.ones(D),
                        p + "mlp.gate_proj.weight": torch.randn(64, D, generator=g),
                        p + "mlp.up_proj.weight": torch.randn(64, D, generator=g),
                        p + "mlp.down_proj.weight": torch.randn(D, 64, generator=g)})
        for name in ("q", "k", "v", "o"):
            tensors[f"{p}self_attn.{name}_proj.weight"] = torch.randn(D, D, generator=g)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    largest = VOCAB * D * 4
    total = sum(t.numel() for t in tensors.values()) * 4
    del tensors
    script = textwrap.dedent(f"""
        import json, torch
        from pathlib import Path
        from engine.config import Config
        from engine.hf.config import model_config_from_llama
        from engine.hf.import_ import _our_sources, stream_weights
        import engine.model, engine.checkpoint

        def hwm():
            line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
            return int(line.split()[1]) * 1024

        folder = Path({str(folder)!r})
        cfg = Config(model=model_config_from_llama(json.loads((folder / "config.json").read_text()), folder))
        sources = _our_sources(folder, cfg.model)
        before = hwm()
        stream_weights(sources, Path({str(tmp_path / "run")!r}), cfg, torch.float32, {{"dp": 1, "pp": 1, "tp": 1}},
                       {{"config": cfg.to_dict()}})
        print(json.dumps({{"before": before, "after": hwm()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    grown = rss["after"] - rss["before"]
    assert grown < 2 * largest, f"import grew the peak RSS by {grown / 2**20:.1f} MiB; bound {2 * largest / 2**20} MiB"
    assert total > 2 * largest  # the bound is below the model: holding it whole would fail this test
