"""`flan export-hf`: a checkpoint as a transformers Llama folder, for every tokenizer kind we load.

    export_hf("runs/tiny/checkpoints/step-000400", "runs/tiny/hf", force=False)

The tokenizer goes out as a `tokenizers` tokenizer.json that AutoTokenizer loads as it is
(tokenizer_class PreTrainedTokenizerFast, so no class-specific rebuilding) and that encodes to our ids:
    sentencepiece-unigram / -bpe   the pieces (and for BPE the merges) of the .model file, with
                                   SentencePiece's own normalisation (its precompiled map, whitespace
                                   trimmed and collapsed where it does that, the "▁" prefix) and byte
                                   fallback; the .model file is copied too, so import-hf brings it back exactly;
    tokenizers                     the tokenizer.json itself.
The weights stream (`stream_weights`): one global tensor at a time is assembled from the checkpoint's
pieces, whatever its layout (a Reader that closes each file after reading from it, so no mapping keeps
the model's pages resident), checked, cast to fp32 and written at its place in model.safetensors, whose
header is known from the index; the host never holds the whole state.
BOS is added by the tokenizer's post-processor exactly when our model adds it. `check_tokenizer` measures
the agreement on sample texts. An existing non-empty OUT is refused (a usage error) unless force=True; then
the new folder is built complete beside OUT (the new export plus OUT's files that are not model files, e.g.
a README, linked in) and swapped in by two renames, so OUT is never half old and half new; the old model
files (shards, index, tokenizer files) go with the old folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path

import torch

from engine.checkpoint import Reader, load_meta
from engine.config import config_from_dict
from engine.errors import USAGE
from engine.hf.config import HFError, hf_name, llama_config
from engine.hf.safetensors_stream import StreamWriter

# What an HF loader reads from a model folder: --force replaces these, and keeps OUT's other files.
HF_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
            "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def _sentencepiece_backend(sp_model: Path):
    """A `tokenizers` Tokenizer encoding like the SentencePiece file (unigram or BPE, byte fallback)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(sp_model).read_bytes())
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    unk = next(i for i, p in enumerate(proto.pieces) if p.type == 2)
    if trainer.model_type == 1:
        model = Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=unk, byte_fallback=trainer.byte_fallback)
    else:
        from transformers.convert_slow_tokenizer import generate_merges

        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        model = BPE(vocab, generate_merges(vocab), unk_token=proto.pieces[unk].piece, fuse_unk=True,
                    byte_fallback=trainer.byte_fallback)
    tok = Tokenizer(model)
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:  # SentencePiece trims both ends and collapses runs of spaces
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:  # one "▁" in front, even before a leading space (Metaspace would not double it)
        steps.append(normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    # Split before every "▁": no piece spans a word boundary, so encoding word by word equals SentencePiece's
    # encoding of the whole text (Viterbi for unigram, merges for BPE).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1 if spec.add_dummy_prefix else 0)])
    return tok


def hf_tokenizer(tokenizer):
    """A transformers fast tokenizer that encodes like our tokenizer, BOS included where ours adds it."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if tokenizer.kind == "tokenizers":
        tok = Tokenizer.from_file(str(tokenizer.path))
    else:
        tok = _sentencepiece_backend(tokenizer.path)
    name = tok.id_to_token
    if tokenizer.add_bos:
        bos = name(tokenizer.bos_id)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tokenizer.bos_id)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    unk = tok.model.unk_token if hasattr(tok.model, "unk_token") else None
    specials = {name(i) for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=name(tokenizer.bos_id), eos_token=name(tokenizer.eos_id),
        pad_token=name(tokenizer.pad_id), unk_token=unk if unk not in specials else None,
        clean_up_tokenization_spaces=False)


def check_tokenizer(hf_tok, tokenizer, texts: list[str]) -> list[str]:
    """Texts on which the exported tokenizer's ids (BOS included) differ from ours (empty when all agree)."""
    return [t for t in texts if hf_tok.encode(t) != tokenizer.bos_prefix + tokenizer.encode(t)]


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HFError(f"{out}: exists and is not a folder; export into a new folder", exit_code=USAGE)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise HFError(f"{out}: already exists and is not empty; export into a new folder, or pass --force to "
                      "replace the model files in it (files of an earlier export that this one does not write "
                      "are removed)", exit_code=USAGE)


def _keep_user_files(out: Path, new: Path) -> None:
    """Link (or copy) into `new` every entry of `out` that is not a model file and that `new` does not hold."""
    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in out.iterdir():
        if (new / entry.name).exists() or any(fnmatch(entry.name, pattern) for pattern in HF_FILES):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=link_or_copy)
        elif entry.is_symlink():
            (new / entry.name).symlink_to(os.readlink(entry))
        else:
            link_or_copy(entry, new / entry.name)


def _swap_in(new: Path, out: Path) -> None:
    """`new` (complete) becomes `out`; the old `out` is removed only once the new one is in place."""
    if not out.exists():
        new.rename(out)
        return
    _keep_user_files(out, new)
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
    out.rename(old / out.name)
    new.rename(out)
    shutil.rmtree(old)


def stream_weights(step_dir: Path, index: dict, tied: bool, path: Path) -> None:
    """The checkpoint's weights as one fp32 safetensors file under HF names, one global tensor in memory at a
    time: each is assembled from its stored pieces (any layout), verified, cast and written at its place."""
    reader = Reader(step_dir, index, keep_open=False)
    names = [n for n, e in index["tensors"].items() if e["kind"] == "model" and not (tied and n == "output.weight")]
    writer = StreamWriter(path, {hf_name(n): (torch.float32, tuple(index["tensors"][n]["shape"])) for n in names},
                          metadata={"format": "pt"})
    try:
        for name in names:
            tensor = reader.full(name).float()
            writer.write(hf_name(name), tensor.contiguous())
            del tensor
    finally:
        writer.close()


def export_hf(step_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write `out` as a Llama-format folder (config, safetensors weights, tokenizer) from a checkpoint folder."""
    from engine.tokenizer import load_tokenizer

    step_dir, out = Path(step_dir), Path(out)
    _check_out(out, force)
    index = load_meta(step_dir)
    cfg = config_from_dict(index["config"], f"{step_dir} (its stored config)")
    tokenizer = load_tokenizer(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-new-", dir=out.parent))
    try:
        stream_weights(step_dir, index, cfg.model.tie_embeddings, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(llama_config(cfg, tokenizer), indent=1))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}))
        hf_tokenizer(tokenizer).save_pretrained(str(tmp))
        if tokenizer.kind != "tokenizers":  # lets `flan import-hf` bring the SentencePiece file back exactly
            shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
