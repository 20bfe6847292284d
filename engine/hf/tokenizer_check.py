"""The tokenizer an import brings in, checked against transformers' AutoTokenizer on probe texts.

    with bring_tokenizer(folder, trust="auto") as staged:   # a temp folder: tokenizer file + tokenizer_config.json
        ...copy staged/* into the run folder

Which file: the folder's tokenizer.model (SentencePiece) when there is one, else its tokenizer.json as
transformers configures it (the backend AutoTokenizer runs, saved whole). Our ids, BOS included where the
model adds it, must equal AutoTokenizer's on every probe (newlines, tabs, leading and repeated spaces,
non-ASCII, digits, rendered dataset prompts); on the first that differs the import stops naming it. When the
folder's tokenizer.model and tokenizer.json disagree, `trust` says which to use: "json" (what transformers
and lm-eval tokenize with) or "model" (SentencePiece's own ids, not checked against transformers).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from engine.errors import USAGE
from engine.hf.config import HFError

TRUST = ("auto", "model", "json")
BASIC_PROBES = ["Hello world", "hello", " leading space", "  two leading spaces", "trailing space ",
                "repeated   spaces", "tabs\tand\nnew\n\nlines", "\n", "\tindent", "naïve café — 東京 ½ ﬁ ü",
                "Ünïcödé 😀 emoji", "12345 + 0.75 = 3e8; 2024-01-31", "OPTIONS:\n- yes\n- no",
                "Premise: A man.\nHypothesis: A person.\n\nDoes the premise entail the hypothesis?"]


def probe_texts(limit_datasets: int = 6) -> list[str]:
    """The basic probes and the rendered prompts of every template of a few local datasets' first row."""
    from engine.paths import shared_data_dir
    from flan.registry import load_registry
    from flan.templates import TemplateError, load_templates, render_template

    texts = list(BASIC_PROBES)
    try:
        data = shared_data_dir()
    except (FileNotFoundError, OSError):
        return texts
    registry = load_registry()
    for name in ("rte", "copa", "cb", "dart", "wmt16_translate_fien", "squad")[:limit_datasets]:
        path = data / name / "validation.jsonl"
        if name not in registry.tasks or not path.is_file():
            continue
        with path.open(encoding="utf-8") as f:
            row = json.loads(f.readline())
        spec = registry.get(name)
        for template in load_templates(spec):
            try:
                example = render_template(spec, template, row)
            except TemplateError:
                continue
            texts += [example.prompt, example.target]
    return texts


def first_difference(ours, theirs, texts: list[str]) -> tuple[str, list[int], list[int]] | None:
    """(text, our ids, transformers' ids) of the first probe where they differ, BOS included."""
    for text in texts:
        a, b = ours.bos_prefix + ours.encode(text), list(theirs.encode(text))
        if a != b:
            return text, a, b
    return None


def _auto_tokenizer(folder: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise HFError("import-hf checks the tokenizer against transformers' AutoTokenizer; install transformers "
                      "(requirements-test.txt)") from None
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many kinds; the folder is what is wrong
        raise HFError(f"{folder}: transformers cannot load its tokenizer ({type(e).__name__}: {e})") from None


def _special_config(auto) -> dict:
    """Our tokenizer_config.json: the specials transformers uses, and whether it puts BOS first."""
    plain, wrapped = auto.encode("a", add_special_tokens=False), auto.encode("a")
    adds_bos = auto.bos_token_id is not None and wrapped[:1] == [auto.bos_token_id] and wrapped[1:] == plain
    return {"bos_token": auto.bos_token, "eos_token": auto.eos_token, "pad_token": auto.pad_token,
            "add_bos_token": adds_bos}


@contextlib.contextmanager
def bring_tokenizer(folder: Path, trust: str = "auto"):
    """A temporary folder holding the checked tokenizer file and our tokenizer_config.json (see module doc)."""
    from engine.tokenizer import Tokenizer

    if trust not in TRUST:
        raise HFError(f"--trust-tokenizer {trust!r}: choose one of {', '.join(TRUST)}")
    sp_file, json_file = folder / "tokenizer.model", folder / "tokenizer.json"
    if not sp_file.is_file() and not json_file.is_file():
        raise HFError(f"{folder}: neither tokenizer.model nor tokenizer.json; import-hf needs the model's tokenizer")
    if trust == "model" and not sp_file.is_file():
        raise HFError(f"--trust-tokenizer model: {folder} has no tokenizer.model")
    auto = _auto_tokenizer(folder)
    use_sp = sp_file.is_file() and trust != "json"
    with tempfile.TemporaryDirectory(prefix="flan-tokenizer-") as tmp:
        staged = Path(tmp)
        (staged / "tokenizer_config.json").write_text(json.dumps(_special_config(auto), indent=1))
        if use_sp:
            shutil.copyfile(sp_file, staged / "tokenizer.model")
        else:
            (staged / "tokenizer.json").write_text(auto.backend_tokenizer.to_str())
        ours = Tokenizer.load(staged / ("tokenizer.model" if use_sp else "tokenizer.json"))
        if ours.vocab_size > len(auto) or (trust != "model" and ours.vocab_size != len(auto)):
            raise HFError(f"{folder}: our tokenizer has {ours.vocab_size} tokens, transformers' {len(auto)}")
        diff = None if trust == "model" else first_difference(ours, auto, probe_texts())
        if diff is not None:
            text, a, b = diff
            if use_sp and json_file.is_file():
                raise HFError(f"{folder}: tokenizer.model and tokenizer.json disagree on {text!r} (SentencePiece "
                              f"ids {a}, transformers' {b}); pass --trust-tokenizer=json to tokenize as "
                              "transformers and lm-eval do, or --trust-tokenizer=model for SentencePiece's ids",
                              exit_code=USAGE)  # the command needs a choice only the user can make
            raise HFError(f"{folder}: our tokenizer ({ours.kind}) gives ids {a} on {text!r} but transformers' "
                          f"AutoTokenizer gives {b}; this tokenizer cannot be imported faithfully")
        yield staged
