"""Tiny transformers Llama folders made locally (nothing can be downloaded): random weights from a LlamaConfig
and tokenizers trained on the shared corpus, in the two kinds the importer meets.

    llama2_folder(out, corpus)   tokenizer.model (SentencePiece BPE, byte fallback, Llama 2's normalisation) +
                                 the tokenizer.json transformers converts it to, add_bos_token; untied head;
                                 fp32 in several shards + index. As with Llama 2 under transformers 5, the two
                                 files disagree on leading spaces (its Metaspace never doubles a "▁")
    llama3_folder(out, corpus)   tokenizer.json only (byte-level BPE, <|begin_of_text|> added by its
                                 post-processor); rope_scaling llama3; tied head; bf16, one file
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 512


def _corpus_lines(corpus: Path, n: int = 3000) -> list[str]:
    return [line.strip() for line in (corpus / "train.txt").read_text().splitlines()[:n] if line.strip()]


def _model(folder: Path, vocab: int, dtype: torch.dtype, max_shard_size: str | None, **fields) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                      **fields)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norm gains away from 1 so that a swapped norm would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(folder, max_shard_size=max_shard_size or "5GB")


def llama2_folder(out: Path, corpus: Path, **sp_options) -> Path:
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(_corpus_lines(corpus)), model_prefix=str(out / "sp"), vocab_size=VOCAB,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,  # Llama 2's
        pad_id=-1, unk_id=0, bos_id=1, eos_id=2, num_threads=1, minloglevel=2, **sp_options)
    (out / "sp.model").rename(out / "tokenizer.model")
    (out / "sp.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False,
                                                           "add_bos_token": True}))
    LlamaTokenizer.from_pretrained(out).save_pretrained(out)  # transformers' own conversion -> tokenizer.json
    _model(out, VOCAB, torch.float32, "20KB", tie_word_embeddings=False, rope_theta=10000.0)
    return out


def llama3_folder(out: Path, corpus: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus_lines(corpus), trainers.BpeTrainer(
        vocab_size=VOCAB - len(specials), special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(specials)
    bos = tok.token_to_id(specials[0])
    tok.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A", pair=f"{specials[0]} $A $B",
                                                       special_tokens=[(specials[0], bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(out)
    (out / "tokenizer.model").unlink(missing_ok=True)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    _model(out, vocab, torch.bfloat16, None, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=rope,
           bos_token_id=bos, eos_token_id=tok.token_to_id(specials[1]))
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


_BUILT: dict[str, Path] = {}


def built(kind: str, tmp_path_factory, corpus: Path) -> Path:
    """One folder of each kind per test session (test modules share them; treat them as read-only)."""
    if kind not in _BUILT:
        make = {"llama2": llama2_folder, "llama3": llama3_folder}[kind]
        _BUILT[kind] = make(tmp_path_factory.mktemp(kind), corpus)
    return _BUILT[kind]


def probe_texts(shared_data: Path) -> list[str]:
    """Texts that tokenizers disagree on when they disagree at all, plus some real dataset rows."""
    texts = ["Hello world", " leading space", "  two leading", "trailing  ", "tabs\tand\nnew\n\nlines",
             "\n", "naïve café — 東京 ½ ﬁ", "12345 + 0.75 = 3e8", "OPTIONS:\n- yes\n- no"]
    for folder in ("rte", "wmt16_translate_fien"):
        with (shared_data / folder / "validation.jsonl").open() as f:
            for _, line in zip(range(10), f):
                texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    return texts
