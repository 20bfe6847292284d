"""Hugging Face interop: transformers Llama-architecture folders in (`flan import-hf`) and out (`flan export-hf`).

    flan import-hf path/to/llama-folder runs/llama [--dtype bfloat16] [--layout dp=1,pp=1,tp=2]
    torchrun --nproc-per-node=2 -m flan import-hf path/to/llama-folder runs/llama --layout tp=2   # a rank a shard
    flan tune runs/llama/config.toml --train.init_from=runs/llama
    flan export-hf runs/llama/tuned runs/llama-flan-hf [--force]
    flan eval configs/tiny.toml --hf path/to/llama-folder      # imported to a temporary checkpoint

One job per module: config.py (config.json <-> ModelConfig, tensor names), safetensors_stream.py (tensor by
tensor file I/O), import_.py (streaming import into the sharded checkpoint format, any layout, one process
or every torchrun rank writing its own shards),
tokenizer_check.py (the tokenizer an import brings, checked against AutoTokenizer), export.py (folders out,
every tokenizer kind, weights streamed one global tensor at a time).
"""
from engine.hf.config import HFError, hf_name, llama_config, model_config_from_llama, our_name
from engine.hf.export import check_tokenizer, export_hf, hf_tokenizer
from engine.hf.import_ import config_toml, import_hf

__all__ = ["HFError", "hf_name", "llama_config", "model_config_from_llama", "our_name", "check_tokenizer",
           "export_hf", "hf_tokenizer", "config_toml", "import_hf"]
