"""SentencePiece tokenizer: trained on the corpus and dataset text, cached by a hash of inputs and settings.

    flan tokenizer train configs/tiny.toml        # trains (or finds in the cache) and prints the path

Any existing SentencePiece .model file can be used instead with --data.tokenizer=PATH.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import sentencepiece as spm

from engine.config import Config
from engine.paths import REPO_ROOT, shared_data_dir

# Fixed special ids so that checkpoints and packed batches agree across trained tokenizers.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    def __init__(self, processor: spm.SentencePieceProcessor, path: Path):
        self.sp = processor
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: SentencePiece model not found; train one with "
                                    "`flan tokenizer train CONFIG` or set --data.tokenizer=PATH to a .model file")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
        return cls(sp, path)

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def pad_id(self) -> int:
        return max(self.sp.pad_id(), 0)

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        """Token ids without BOS/EOS."""
        return self.sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.Encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


def training_files(cfg: Config) -> list[Path]:
    """The corpus train split plus every dataset's train.jsonl found under the data folder."""
    data = shared_data_dir(cfg.data.data_dir or None)
    corpus = data / "corpus" / "train.txt"
    if not corpus.is_file():
        raise FileNotFoundError(f"{corpus}: the pretraining corpus is missing from the shared data folder")
    return [corpus] + sorted(data.glob("*/train.jsonl"))


def _text_lines(path: Path):
    """Plain lines of a .txt file, or every string value of each JSONL row."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if path.suffix == ".jsonl":
                row = json.loads(line)
                for value in row.values():
                    if isinstance(value, str) and value.strip():
                        yield value.strip()
            elif line.strip():
                yield line.strip()


def cached_model_path(cfg: Config) -> Path:
    """Cache key: content hash of the training files and every setting that changes the model."""
    h = hashlib.sha256()
    for path in training_files(cfg):
        h.update(path.name.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    h.update(f"unigram|{cfg.model.vocab_size}|{cfg.data.tokenizer_sentences}|{cfg.train.seed}|v1".encode())
    cache = Path(cfg.data.tokenizer_cache)
    if not cache.is_absolute():
        cache = REPO_ROOT / cache
    return cache / f"sp-{cfg.model.vocab_size}-{h.hexdigest()[:16]}.model"


def train_tokenizer(cfg: Config) -> Path:
    """Train (or reuse from the cache) a unigram SentencePiece model with cfg.model.vocab_size pieces."""
    out = cached_model_path(cfg)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [line for path in training_files(cfg) for line in _text_lines(path)]
    rng = random.Random(cfg.train.seed)
    if len(lines) > cfg.data.tokenizer_sentences:
        lines = rng.sample(lines, cfg.data.tokenizer_sentences)
    tmp = out.with_suffix(".tmp")
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(lines), model_prefix=str(tmp), vocab_size=cfg.model.vocab_size,
        model_type="unigram", character_coverage=0.9995, byte_fallback=True,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        input_sentence_size=cfg.data.tokenizer_sentences, shuffle_input_sentence=False,
        max_sentence_length=16384, num_threads=2, minloglevel=2,
    )
    tmp.with_suffix(".tmp.model").replace(out)  # rename last: a half-written model is never cached
    tmp.with_suffix(".tmp.vocab").unlink(missing_ok=True)
    return out


def load_tokenizer(cfg: Config) -> Tokenizer:
    """The configured .model file, or the cached trained one (training it first if needed)."""
    tok = Tokenizer.load(cfg.data.tokenizer) if cfg.data.tokenizer else Tokenizer.load(train_tokenizer(cfg))
    if tok.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"{tok.path}: tokenizer has {tok.vocab_size} pieces but model.vocab_size="
                         f"{cfg.model.vocab_size}; set --model.vocab_size={tok.vocab_size} or use another tokenizer")
    return tok
