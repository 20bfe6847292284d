"""Instruction templates as data: templates/<dataset>.toml, validated on load, rendered without eval.

    ex = render("rte", row, template_index=3)     # RenderedExample(prompt, target, options)

A templates file holds `[[template]]` tables with `input`, `target` and optionally `turned_around = true`
(the task inverted, e.g. write a hypothesis given a premise and an answer). Patterns contain `{slot}`
placeholders and `{{`/`}}` for literal braces. A slot is a field of the dataset's registry entry or, for
cls/mc datasets, a derived slot:
    {answer_}   the gold option string (a cls label mapped to FLAN's option text, or the chosen mc option)
    {options_}  the OPTIONS block, "OPTIONS:\\n- first\\n- second"
Loading rejects, naming file, template and slot: unknown slots, attribute access `{a.b}`, indexing
`{a[0]}`, conversions `{a!r}` and format specs `{a:>3}`; a cls/mc template that is not turned around
must target exactly "{answer_}" (so a scorer can rank the options) and must not show the answer in its
input. Such templates get the OPTIONS block appended after a blank line unless they place {options_}
or set `options = "none"` (they write the options themselves, as lm-eval's "... Options: yes, no\nAnswer:"
does, or leave them out). `delimiter` (default "") is the text between prompt and answer when options are
scored: the answer's tokens are then those the tokenizer gives (prompt + delimiter + option) after the
prompt's own, lm-eval's rule; without one, the option's own tokens follow the prompt's (tuning's layout).

Field values become text by type: list -> "a, b, c"; triples -> "s | p | o; s | p | o";
numbered -> "1. a\\n2. b"; a missing optional field -> "".
"""
from __future__ import annotations

import math
import string
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from engine.errors import FlanError
from engine.paths import REPO_ROOT
from flan.registry import ANSWER_SLOT, OPTIONS_SLOT, TASKS_DIR, TaskSpec, load_registry

_PACKAGED_TEMPLATES = Path(__file__).resolve().parent / "template_files"  # where a wheel carries them (setup.py)
TEMPLATES_DIR = _PACKAGED_TEMPLATES if _PACKAGED_TEMPLATES.is_dir() else REPO_ROOT / "templates"
TEMPLATE_KEYS = ("input", "target", "turned_around", "options", "delimiter")
OPTIONS_PLACEMENT = ("append", "none")
ANSWER_TARGET = "{" + ANSWER_SLOT + "}"


class TemplateError(FlanError, ValueError):
    """A templates file is malformed, or a row cannot be rendered."""


@dataclass(frozen=True)
class Template:
    index: int
    input: str
    target: str
    turned_around: bool
    input_parts: tuple[tuple[str, str | None], ...]   # (literal text, slot or None) pairs
    target_parts: tuple[tuple[str, str | None], ...]
    slots: frozenset[str]                             # every slot of input and target
    options: str = "append"                           # "append" the OPTIONS block (unless placed), or "none"
    delimiter: str = ""                               # text between the prompt and a scored answer

    @property
    def has_options(self) -> bool:
        """Scored over a fixed option list (cls/mc, not turned around)."""
        return self.target == ANSWER_TARGET and not self.turned_around


@dataclass(frozen=True)
class RenderedExample:
    prompt: str
    target: str
    options: tuple[str, ...] | None   # the choices the scorer ranks; None for generation
    delimiter: str = ""               # the template's text between prompt and answer


def parse_pattern(pattern: str, where: str) -> tuple[tuple[str, str | None], ...]:
    """Split a pattern into (literal, slot) parts, refusing anything beyond a bare `{name}`."""
    parts = []
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as e:
        raise TemplateError(f"{where}: unbalanced braces ({e}); write {{{{ and }}}} for literal braces") from None
    for literal, slot, spec, conversion in parsed:
        if slot is None:
            parts.append((literal, None))
            continue
        if conversion or spec or not slot.isidentifier():
            shown = "{" + slot + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise TemplateError(f"{where}: slot {shown} is not allowed; templates take bare {{field}} slots only "
                                "(no attribute access, indexing, conversion or format spec)")
        parts.append((literal, slot))
    return tuple(parts)


def _slots(parts) -> set[str]:
    return {slot for _, slot in parts if slot is not None}


def _leaking_slots(spec: TaskSpec) -> set[str]:
    """Slots that reveal the gold answer when shown in the input of a scored template."""
    leaks = {ANSWER_SLOT}
    if spec.labels:
        leaks.add(spec.labels.field)
    if spec.choices:
        leaks.update(f for f in (spec.choices.label_field, spec.choices.answer_field) if f)
        if "answer" in spec.fields:  # mc rows often repeat the gold option as `answer`
            leaks.add("answer")
    return leaks


def parse_templates(spec: TaskSpec, path: Path) -> tuple[Template, ...]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise TemplateError(f"{path}: not valid TOML: {e}") from None
    entries = data.get("template")
    if set(data) != {"template"} or not isinstance(entries, list) or not entries:
        raise TemplateError(f"{path}: expected only [[template]] tables ({', '.join(TEMPLATE_KEYS)})")
    out = []
    for i, entry in enumerate(entries):
        where = f"{path}: template {i}"
        extra = set(entry) - set(TEMPLATE_KEYS)
        if extra:
            raise TemplateError(f"{where}: unknown keys {sorted(extra)}; accepted: {', '.join(TEMPLATE_KEYS)}")
        if entry.get("options", "append") not in OPTIONS_PLACEMENT:
            raise TemplateError(f"{where}: options = {entry['options']!r}; accepted: {', '.join(OPTIONS_PLACEMENT)}")
        if not isinstance(entry.get("delimiter", ""), str):
            raise TemplateError(f"{where}: delimiter must be a string, e.g. \" \" between \"Answer:\" and the answer")
        if not isinstance(entry.get("input"), str) or not isinstance(entry.get("target"), str):
            raise TemplateError(f"{where}: `input` and `target` must both be strings")
        turned = entry.get("turned_around", False)
        if not isinstance(turned, bool):
            raise TemplateError(f"{where}: turned_around must be true or false")
        inp = parse_pattern(entry["input"], f"{where} input")
        tgt = parse_pattern(entry["target"], f"{where} target")
        for slot in sorted(_slots(inp) | _slots(tgt)):
            if slot not in spec.slots:
                raise TemplateError(f"{where}: unknown slot {{{slot}}} for dataset {spec.name}; "
                                    f"its slots are {', '.join(sorted(spec.slots))} (fields in {spec.source})")
        if not _slots(tgt) and not turned:
            raise TemplateError(f"{where}: the target has no slot, so every example would share one answer")
        if spec.kind in ("cls", "mc") and not turned:
            if entry["target"] != ANSWER_TARGET:
                raise TemplateError(f"{where}: a {spec.kind} template must target exactly {ANSWER_TARGET} "
                                    "(or set turned_around = true)")
            leaked = _slots(inp) & _leaking_slots(spec)
            if leaked:
                raise TemplateError(f"{where}: the input shows the answer through {{{sorted(leaked)[0]}}}")
        slots = frozenset(_slots(inp) | _slots(tgt))
        out.append(Template(i, entry["input"], entry["target"], turned, inp, tgt, slots,
                            entry.get("options", "append"), entry.get("delimiter", "")))
    return tuple(out)


@lru_cache(maxsize=256)
def _load_cached(spec: TaskSpec, path: Path) -> tuple[Template, ...]:
    return parse_templates(spec, path)


def templates_folder(spec: TaskSpec) -> Path:
    """templates/ of the repo for the package's tasks; <DIR>/templates for a task read from <DIR>/tasks
    (flan eval --include DIR)."""
    return TEMPLATES_DIR if spec.source.parent == TASKS_DIR else spec.source.parent.parent / "templates"


def load_templates(spec: TaskSpec, folder: str | Path | None = None) -> tuple[Template, ...]:
    """The validated templates of one dataset (read once per process), from `folder` or templates_folder."""
    path = Path(folder or templates_folder(spec)) / f"{spec.name}.toml"
    if not path.is_file():
        raise TemplateError(f"{path}: no templates file for dataset {spec.name}; "
                            "add one with [[template]] tables (see templates/rte.toml)")
    return _load_cached(spec, path)


def _as_text(value, typ: str) -> str:
    if value is None:
        return ""
    if typ == "list":
        return ", ".join(map(str, value))
    if typ == "triples":
        return "; ".join(" | ".join(map(str, t)) for t in value)
    if typ == "numbered":
        return "\n".join(f"{i}. {v}" for i, v in enumerate(value, 1))
    return str(value)


def label_index(spec: TaskSpec, row: dict) -> int:
    """Index of the gold option of a cls/mc row (ValueError when the row's label is not an option)."""
    if spec.labels:
        raw = row[spec.labels.field]
        if spec.labels.round:
            raw = math.floor(float(raw) + 0.5)
        return spec.labels.values.index(str(raw))
    ch = spec.choices
    if ch.label_field:
        index = row[ch.label_field]
        if not isinstance(index, int) or not 0 <= index < len(options_of(spec, row)):
            raise ValueError(f"label {index!r} is not an option index")
        return index
    gold = row[ch.answer_field]
    gold = gold[0] if isinstance(gold, list) and gold else gold
    return options_of(spec, row).index(gold)


def options_of(spec: TaskSpec, row: dict) -> list[str]:
    """The option strings of a cls/mc row, in index order."""
    if spec.labels:
        return list(spec.labels.options)
    ch = spec.choices
    return list(row[ch.list_field]) if ch.list_field else [row[f] for f in ch.option_fields]


def options_block(options: list[str]) -> str:
    return "OPTIONS:\n" + "\n".join(f"- {o}" for o in options)


def _fill(parts, values: dict[str, str]) -> str:
    return "".join(literal + values[slot] if slot else literal for literal, slot in parts)


def bare_inputs(spec: TaskSpec, template: Template, values: dict[str, str], instruction_format: str) -> str:
    """The FLAN paper's instruction ablations (section 4.3): the template's input fields alone, one per line,
    without its instruction text ("none"), or after a dataset-name prefix ("dataset_name", e.g. "[Translation:
    WMT16 en-fi]")."""
    slots = dict.fromkeys(s for _, s in template.input_parts if s is not None and s != OPTIONS_SLOT)
    text = "\n".join(values[s] for s in slots)
    if instruction_format == "dataset_name":
        return f"[{load_registry().cluster(spec.cluster).title}: {spec.paper_dataset}] {text}"
    return text


def render_template(spec: TaskSpec, template: Template, row: dict,
                    instruction_format: str = "flan") -> RenderedExample:
    """Fill one template with one row (data.instruction_format "flan"; "none" and "dataset_name": bare_inputs)."""
    try:
        values = {name: _as_text(row.get(name), spec.fields[name].type) for name in template.slots
                  if name in spec.fields}
        options = None
        if spec.kind in ("cls", "mc"):
            opts = options_of(spec, row)
            values[ANSWER_SLOT] = str(opts[label_index(spec, row)])
            values[OPTIONS_SLOT] = options_block(opts)
            if template.has_options:
                options = tuple(opts)
        bare = instruction_format != "flan"
        prompt = (bare_inputs(spec, template, values, instruction_format) if bare
                  else _fill(template.input_parts, values))
        if options is not None and (bare or (OPTIONS_SLOT not in template.slots and template.options == "append")):
            prompt = f"{prompt}\n\n{values[OPTIONS_SLOT]}"
        return RenderedExample(prompt, _fill(template.target_parts, values), options, template.delimiter)
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise TemplateError(f"dataset {spec.name}, template {template.index}: cannot render row "
                            f"({type(e).__name__}: {e}); check the row against {spec.source}") from None


def render(dataset: str | TaskSpec, row: dict, template_index: int, *,
           templates_dir: str | Path | None = None) -> RenderedExample:
    """Render `row` of `dataset` (a registry name or TaskSpec) with its template number `template_index`."""
    spec = load_registry().get(dataset) if isinstance(dataset, str) else dataset
    templates = load_templates(spec, templates_dir)
    if not 0 <= template_index < len(templates):
        raise TemplateError(f"{spec.name}: template index {template_index} out of range; "
                            f"it has templates 0..{len(templates) - 1}")
    return render_template(spec, templates[template_index], row)
