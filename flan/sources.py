"""Where each FLAN dataset's public data lives: the `[source]` table of a task file, and the hub row -> task
row mapping that `flan data prepare` applies.

    [source]
    hub = "super_glue"              # Hugging Face hub dataset id
    config = "cb"                   # hub config (subset), when the dataset has several
    revision = "main"               # optional: the hub revision to read
    tfds = "super_glue/cb"          # for reference: the TFDS name FLAN read it from
    splits = { train = "train", validation = "validation" }   # task split = hub split, or a list (concatenated)
    unlabelled = -1                 # optional: rows whose gold-label column holds this hub value are left out
    no_hub = "why"                  # instead of a usable hub copy: why there is none (hub may still be named)
    [source.columns]                # task field = hub column; "a.b" reads key b of column a (each item's, for a list)
    [source.maps]                   # task field = list (hub int i -> value i) or table ("hub value" = value)
    [source.derive]                 # task field = "gold_option" | "first:<column>" | "index_of:<column>:<list column>"
                                    #              | "const:<text>"

Every required field of the task is filled by exactly one of columns or derive (an optional field may be
left out). Hub values are coerced only where the hub's type differs in a lossless way: a bool or a string
of digits read into an `int` field, an int into a `float` field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import FlanError

TASK_SPLITS = ("train", "validation", "test")
DERIVE_RULES = ("gold_option", "first", "index_of", "const")


class SourceError(FlanError, ValueError):
    """A task file's [source] table is malformed (raised as RegistryError by the registry)."""


class MapError(FlanError, ValueError):
    """A hub row does not map onto the task's fields (the reason; the caller adds dataset, split, row)."""


@dataclass(frozen=True)
class SourceSpec:
    hub: str = ""
    config: str = ""
    revision: str = ""
    tfds: str = ""
    splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    maps: dict[str, dict[str, object]] = field(default_factory=dict)   # keys: str(hub value)
    derive: dict[str, str] = field(default_factory=dict)
    unlabelled: object = None
    no_hub: str = ""

    @property
    def preparable(self) -> bool:
        return bool(self.hub) and not self.no_hub

    @property
    def hub_columns(self) -> set[str]:
        """Top-level hub columns the mapping reads."""
        cols = {c.split(".")[0] for c in self.columns.values()}
        for rule in self.derive.values():
            kind, _, arg = rule.partition(":")
            if kind in ("first", "index_of"):
                cols |= {a.split(".")[0] for a in arg.split(":")}
        return cols


def _str_table(path: Path, table, name: str) -> dict[str, str]:
    if table is None:
        return {}
    if not isinstance(table, dict) or not all(isinstance(v, str) and v for v in table.values()):
        raise SourceError(f"{path}: [source.{name}] must map task fields to non-empty strings")
    return dict(table)


def parse_source(path: Path, table, fields: dict, kind: str, label_field: str | None) -> SourceSpec:
    """Validate a [source] table against the task's fields; every problem names the file and the key."""
    if not isinstance(table, dict):
        raise SourceError(f"{path}: [source] is missing; name the Hugging Face hub dataset (hub, config, splits, "
                          "columns) or say why there is none with no_hub = \"...\"")
    known = {"hub", "config", "revision", "tfds", "splits", "columns", "maps", "derive", "unlabelled", "no_hub"}
    if set(table) - known:
        raise SourceError(f"{path}: [source] unknown keys {sorted(set(table) - known)}; accepted: {', '.join(sorted(known))}")
    for key in ("hub", "config", "revision", "tfds", "no_hub"):
        if not isinstance(table.get(key, ""), str):
            raise SourceError(f"{path}: [source] {key} must be a string")
    if not table.get("hub") and not table.get("no_hub"):
        raise SourceError(f"{path}: [source] needs hub = \"<hub dataset id>\" or no_hub = \"<why there is no hub copy>\"")
    splits = {}
    for split, hub in (table.get("splits") or {}).items():
        names = (hub,) if isinstance(hub, str) else tuple(hub) if isinstance(hub, list) else ()
        if split not in TASK_SPLITS or not names or not all(isinstance(n, str) and n for n in names):
            raise SourceError(f"{path}: [source] splits.{split}: keys are {', '.join(TASK_SPLITS)}, values a hub "
                              "split name or a list of them")
        splits[split] = names
    columns = _str_table(path, table.get("columns"), "columns")
    derive = _str_table(path, table.get("derive"), "derive")
    maps = {}
    for name, m in (table.get("maps") or {}).items():
        if isinstance(m, list):
            maps[name] = {str(i): v for i, v in enumerate(m)}
        elif isinstance(m, dict):
            maps[name] = dict(m)
        else:
            raise SourceError(f"{path}: [source.maps] {name} must be a list (hub int i -> value) or a table")
        if name not in columns:
            raise SourceError(f"{path}: [source.maps] {name} maps a field not read from [source.columns]")
    spec = SourceSpec(table.get("hub", ""), table.get("config", ""), table.get("revision", ""), table.get("tfds", ""),
                      splits, columns, maps, derive, table.get("unlabelled"), table.get("no_hub", ""))
    if not spec.preparable:
        return spec
    if not splits:
        raise SourceError(f"{path}: [source] splits is missing (e.g. splits = {{ train = \"train\" }})")
    for name in set(columns) | set(derive):
        if name not in fields:
            raise SourceError(f"{path}: [source] fills {name!r}, which is not in [fields] ({', '.join(fields)})")
    both = set(columns) & set(derive)
    if both:
        raise SourceError(f"{path}: [source] fields {sorted(both)} are in both columns and derive; keep one")
    for name, f in fields.items():
        if name not in columns and name not in derive and not f.optional:
            raise SourceError(f"{path}: [source] field {name!r} is filled by neither [source.columns] nor "
                              "[source.derive]")
    for name, rule in derive.items():
        kind_, _, arg = rule.partition(":")
        if kind_ not in DERIVE_RULES or (kind_ in ("first", "index_of") and not arg) \
                or (kind_ == "index_of" and arg.count(":") != 1):
            raise SourceError(f"{path}: [source.derive] {name} = {rule!r}; rules: gold_option, first:<column>, "
                              "index_of:<column>:<list column>, const:<text>")
        if kind_ == "gold_option" and kind != "mc":
            raise SourceError(f"{path}: [source.derive] {name} = gold_option is only for mc tasks")
    if spec.unlabelled is not None and (label_field is None or label_field not in columns):
        raise SourceError(f"{path}: [source] unlabelled needs the gold-label field read from [source.columns]")
    return spec


def _lookup(row: dict, path: str):
    """Column `a` or nested key `a.b` of a hub row; a list of records yields the key of each."""
    value = row
    for key in path.split("."):
        if isinstance(value, list):
            value = [v.get(key) if isinstance(v, dict) else None for v in value]
        elif isinstance(value, dict):
            if key not in value:
                raise MapError(f"hub column {path!r} is missing")
            value = value[key]
        else:
            raise MapError(f"hub column {path!r} is missing")
    return value


def _coerce(value, typ: str):
    if typ == "int" and isinstance(value, bool):
        return int(value)
    if typ == "int" and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if typ == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def is_unlabelled(source: SourceSpec, label_field: str | None, hub_row: dict) -> bool:
    """True for a row the hub keeps without a gold label (e.g. GLUE test rows with -1)."""
    if source.unlabelled is None or label_field is None:
        return False
    return _lookup(hub_row, source.columns[label_field]) == source.unlabelled


def map_row(spec, hub_row: dict) -> dict:
    """The task row (spec.fields) of one hub row; MapError says what does not fit."""
    from flan.templates import options_of  # templates import the registry, which imports this module

    source, out = spec.origin, {}
    for name, column in source.columns.items():
        value = _lookup(hub_row, column)
        if name in source.maps:
            key = str(int(value)) if isinstance(value, bool) else str(value)
            if key not in source.maps[name]:
                raise MapError(f"hub value {value!r} of column {column!r} has no entry in [source.maps] {name}")
            value = source.maps[name][key]
        out[name] = _coerce(value, spec.fields[name].type)
    gold = []
    for name, rule in source.derive.items():
        kind, _, arg = rule.partition(":")
        if kind == "const":
            out[name] = arg
        elif kind == "first":
            items = _lookup(hub_row, arg)
            if not isinstance(items, list) or not items:
                raise MapError(f"hub column {arg!r} should be a non-empty list for {name!r}, got {items!r:.60}")
            out[name] = items[0]
        elif kind == "index_of":
            col, list_col = arg.split(":")
            value, items = _lookup(hub_row, col), _lookup(hub_row, list_col)
            if not isinstance(items, list) or value not in items:
                raise MapError(f"{value!r} (hub column {col!r}) is not in hub column {list_col!r} ({items!r:.60})")
            out[name] = items.index(value)
        else:
            gold.append(name)
    for name in gold:  # after the options and the label are in place
        options, label = options_of(spec, out), out.get(spec.choices.label_field)
        if not isinstance(label, int) or not 0 <= label < len(options):
            raise MapError(f"gold label {label!r} is not an index into the {len(options)} options")
        out[name] = options[label]
    for name, f in spec.fields.items():
        if f.optional and out.get(name) is None:
            out.pop(name, None)
    return out
