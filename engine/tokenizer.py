"""Tokenizers behind one interface, with two backends: SentencePiece (.model: unigram or BPE, byte fallback)
and Hugging Face `tokenizers` (tokenizer.json, e.g. Llama 3's byte-level BPE).

    tok = Tokenizer.load("runs/llama/tokenizer.json")   # or a .model file; tokenizer_config.json beside it
    tok.encode("Hello") -> ids without specials;  tok.bos_prefix -> [bos_id] when the model adds BOS
    flan tokenizer train configs/tiny.toml             # trains our own (SentencePiece), cached, prints the path

BOS/EOS/pad and whether BOS starts every input come from the model's own tokenizer_config.json when one lies
beside the file (add_bos_token, bos_token, ...), else from the file itself; a tokenizer we train has no
config and adds no BOS. Training stays SentencePiece unigram, cached by a hash of inputs and settings, on the
corpus (the shared one, or a sample of the streamed data.corpus) and every dataset's train split.
"""
from __future__ import annotations

import hashlib
import json
import random
import warnings
from pathlib import Path

import sentencepiece as spm

from engine.config import Config
from engine.data_files import DataError, json_rows, report_skipped, text_lines
from engine.paths import REPO_ROOT, MissingDataError, shared_data_dir

# Fixed special ids so that checkpoints and packed batches agree across trained tokenizers.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

CONFIG_FILE = "tokenizer_config.json"


def _token_name(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """The interface every backend implements; `Tokenizer.load(path)` picks the backend by the file."""

    path: Path
    kind: str
    """"sentencepiece-unigram", "sentencepiece-bpe" or "tokenizers"."""
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    add_bos: bool
    """Whether the model's inputs start with BOS (tokenizer_config.json's add_bos_token)."""

    @staticmethod
    def load(path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer not found; train one with `flan tokenizer train CONFIG` or "
                                    "set --data.tokenizer=PATH to a SentencePiece .model or a tokenizer.json")
        special = {}
        if (path.parent / CONFIG_FILE).is_file() and path.name in ("tokenizer.model", "tokenizer.json"):
            try:
                special = json.loads((path.parent / CONFIG_FILE).read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"{path.parent / CONFIG_FILE}: not valid JSON ({e})") from None
        backend = HFTokenizer if path.suffix == ".json" else SentencePieceTokenizer
        return backend(path, special)

    @property
    def bos_prefix(self) -> list[int]:
        """What starts every model input: [bos_id] when the model adds BOS, else nothing."""
        return [self.bos_id] if self.add_bos else []

    def encode(self, text: str) -> list[int]:
        """Token ids without BOS/EOS."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _specials(self, special: dict, to_id, defaults: dict[str, int]) -> None:
        """bos/eos/pad ids: the config's named tokens where it names them, else the file's own."""
        for key in ("bos", "eos", "pad"):
            name = _token_name(special.get(f"{key}_token"))
            found = to_id(name) if name else None
            setattr(self, f"{key}_id", found if found is not None else defaults[key])


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, special: dict):
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        self.kind = {1: "sentencepiece-unigram", 2: "sentencepiece-bpe"}.get(proto.trainer_spec.model_type, "")
        if not self.kind:
            raise ValueError(f"{path}: SentencePiece model_type {proto.trainer_spec.model_type} is neither unigram "
                             "nor BPE; only those two are supported")
        self.vocab_size = self.sp.GetPieceSize()

        def to_id(piece):
            i = self.sp.PieceToId(piece)
            return i if self.sp.IdToPiece(i) == piece else None

        # No pad piece (Llama 2): pad with id 0; padding is masked everywhere it is used.
        self._specials(special, to_id,
                       {"bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "pad": max(self.sp.pad_id(), 0)})
        # transformers' LlamaTokenizer (Llama 2, Mistral) adds BOS unless its config says otherwise.
        self.add_bos = bool(special.get("add_bos_token", special.get("tokenizer_class", "").startswith("Llama")))

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.Encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (ids without its post-processor's specials; BOS by add_bos)."""

    kind = "tokenizers"

    def __init__(self, path: Path, special: dict):
        from tokenizers import Tokenizer as Backend

        self.path = path
        try:
            self.tok = Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{path}: not a tokenizers tokenizer.json ({e})") from None
        self.tok.no_padding()
        self.tok.no_truncation()
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        # What the file's own post-processor puts first (Llama 3: <|begin_of_text|>), if anything.
        plain, wrapped = self.tok.encode("a", add_special_tokens=False).ids, self.tok.encode("a").ids
        added = wrapped[0] if len(wrapped) > len(plain) and wrapped[1:1 + len(plain)] == plain else None
        eos = next((i for i in map(self.tok.token_to_id, ("</s>", "<|end_of_text|>")) if i is not None), 0)
        self._specials(special, self.tok.token_to_id, {"bos": added if added is not None else 0, "eos": eos,
                                                       "pad": None})
        if self.pad_id is None:  # Llama 3 names no pad token: pad with EOS (padding is masked)
            self.pad_id = self.eos_id
        self.add_bos = bool(special.get("add_bos_token", added is not None and added == self.bos_id))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def corpus_files(cfg: Config) -> list[Path]:
    """The pretraining corpus's files: data.corpus's, or the shared corpus/train.txt."""
    if cfg.data.corpus:
        from engine.corpus_stream import corpus_files as streamed_files

        return streamed_files(cfg.data.corpus, "data.corpus")
    corpus = shared_data_dir(cfg.data.data_dir or None) / "corpus" / "train.txt"
    if not corpus.is_file():
        raise DataError(f"{corpus}: the pretraining corpus is missing from the data folder; restore it, point "
                        "--data.data_dir at a folder holding corpus/train.txt, or stream one with --data.corpus=GLOB")
    return [corpus]


def dataset_files(cfg: Config) -> list[Path]:
    """Every dataset's train.jsonl under the data folder (none when a streamed corpus comes without one)."""
    try:
        data = shared_data_dir(cfg.data.data_dir or None)
    except MissingDataError:
        if cfg.data.corpus:
            return []
        raise
    return sorted(data.glob("*/train.jsonl"))


def training_files(cfg: Config) -> list[Path]:
    """What the tokenizer learns from: the corpus, then every dataset's train split."""
    return corpus_files(cfg) + dataset_files(cfg)


def _dataset_lines(path: Path, bad_rows: str, skipped: list[str]):
    """Every string value of each row of a dataset's JSONL file; a bad line is reported by file and line (or
    skipped and recorded, as data.bad_rows says)."""
    for _, row in json_rows(path, bad_rows, skipped):
        for value in row.values():
            if isinstance(value, str) and value.strip():
                yield value.strip()


def _corpus_lines(cfg: Config) -> list[str]:
    """The corpus's lines: all of the shared corpus, or a streamed corpus's first tokenizer_sentences records in
    its first epoch's shard order (never the whole of a corpus of any size)."""
    if cfg.data.corpus:
        from engine.corpus_stream import corpus_texts

        where, lines = f"--data.corpus={cfg.data.corpus}", list(corpus_texts(cfg, cfg.data.tokenizer_sentences))
    else:
        (path,), skipped = corpus_files(cfg), []
        where, lines = str(path), list(text_lines(path, cfg.data.bad_rows, skipped))
        report_skipped("tokenizer training", skipped)
    if not lines:
        raise DataError(f"{where}: the pretraining corpus holds no text; restore it or point it at text files")
    return lines


def training_lines(cfg: Config) -> list[str]:
    """Every line the tokenizer may sample from, with skipped rows and empty files reported (an empty corpus
    is an error, an empty dataset file a warning naming it)."""
    lines = _corpus_lines(cfg)
    for path in dataset_files(cfg):
        skipped: list[str] = []
        before = len(lines)
        lines.extend(_dataset_lines(path, cfg.data.bad_rows, skipped))
        report_skipped("tokenizer training", skipped)
        if len(lines) == before:
            warnings.warn(f"{path}: dataset {path.parent.name}'s train split holds no text; the tokenizer is "
                          "trained without it", stacklevel=2)
    return lines


def _fingerprint(path: Path) -> bytes:
    """A file's part of the cache key: its content hash, or for a file over 64 MiB (a streamed corpus) its
    size and modification time, so that a key never costs a pass over a corpus of any size."""
    stat = path.stat()
    if stat.st_size > 64 << 20:
        return f"{stat.st_size}:{stat.st_mtime_ns}".encode()
    return hashlib.sha256(path.read_bytes()).digest()


def cached_model_path(cfg: Config) -> Path:
    """Cache key: the training files (_fingerprint) and every setting that changes the model."""
    h = hashlib.sha256()
    for path in training_files(cfg):
        h.update(path.name.encode())
        h.update(_fingerprint(path))
    if cfg.data.corpus:  # which records a streamed corpus gives the trainer
        h.update(f"corpus|{cfg.data.corpus_shard_mb}".encode())
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
    lines = training_lines(cfg)
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
    """The configured tokenizer file (.model or tokenizer.json), or the cached trained one (trained if needed)."""
    tok = Tokenizer.load(cfg.data.tokenizer) if cfg.data.tokenizer else Tokenizer.load(train_tokenizer(cfg))
    if tok.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"{tok.path}: tokenizer has {tok.vocab_size} pieces but model.vocab_size="
                         f"{cfg.model.vocab_size}; set --model.vocab_size={tok.vocab_size} or use another tokenizer")
    return tok
