"""The FLAN task registry: one TOML entry per dataset in flan/tasks/, found by scanning the folder.

    reg = load_registry()                 # flan/tasks/*.toml, sorted; "_clusters.toml" holds the clusters
    spec = reg.get("rte")                 # TaskSpec: cluster, kind, fields, labels, metric, data folder
    reg.training_tasks(heldout="nli")     # leave-one-cluster-out, with FLAN's extra exclusions

A dataset is data: adding one takes a task file here, a templates file in templates/ and a JSONL folder
under the shared data directory; no code. Entry keys (see flan/tasks/rte.toml for an example):

    name, cluster, paper_dataset, kind ("cls" | "mc" | "gen"), metric, data (folder), notes
    [fields]   field = type, type one of FIELD_TYPES, with a trailing "?" when the field may be absent/null
    [labels]   (cls) field, values (raw row values in index order), options (FLAN's strings), round
    [choices]  (mc) list = list field of options, or fields = [one field per option];
               label = int index field, or answer = field holding the gold option (a list: its first item)
    [derived]  generator ("fix_punct" | "math_dataset"), train, validation (example counts)
    [source]   where the public data lives: hub id, config, splits, column mapping (flan/sources.py)
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from engine.errors import USAGE, FlanError
from flan.sources import SourceError, SourceSpec, parse_source

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
CLUSTERS_FILE = "_clusters.toml"

KINDS = ("cls", "mc", "gen")
FIELD_TYPES = ("text", "int", "float", "list", "triples", "numbered")
METRICS = ("accuracy", "exact_match", "f1", "bleu", "rouge")
GENERATORS = ("fix_punct", "math_dataset")
# Derived slots cls/mc templates may use besides the fields: the gold option string and the OPTIONS
# block. Derived names end in "_" and fields may not, so a row field called `answer` never collides.
ANSWER_SLOT, OPTIONS_SLOT = "answer_", "options_"


class RegistryError(FlanError, ValueError):
    """A task file is malformed, two files claim one name, or a name is unknown."""


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str
    optional: bool


@dataclass(frozen=True)
class LabelSpec:
    """A classification label: the raw value in the row selects an option string by index."""
    field: str
    values: tuple[str, ...]
    options: tuple[str, ...]
    round: bool = False  # numeric scores rounded half up to an integer before lookup (STS-B)


@dataclass(frozen=True)
class ChoiceSpec:
    """Where a multiple-choice row keeps its options and its gold choice."""
    list_field: str | None
    option_fields: tuple[str, ...]
    label_field: str | None
    answer_field: str | None


@dataclass(frozen=True)
class DerivedSpec:
    generator: str
    sizes: dict[str, int]


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: the registry holds one per task
class TaskSpec:
    name: str
    cluster: str
    paper_dataset: str
    kind: str
    metric: str
    fields: dict[str, FieldSpec]
    source: Path
    data: str | None = None
    notes: str = ""
    labels: LabelSpec | None = None
    choices: ChoiceSpec | None = None
    derived: DerivedSpec | None = None
    origin: SourceSpec | None = None   # the [source] table: where the public data lives (flan/sources.py)

    @property
    def slots(self) -> frozenset[str]:
        """Names a template may put in braces."""
        extra = {ANSWER_SLOT, OPTIONS_SLOT} if self.kind in ("cls", "mc") else set()
        return frozenset(self.fields) | extra


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    title: str
    also_exclude: tuple[str, ...]


@dataclass
class Registry:
    tasks: dict[str, TaskSpec]
    clusters: dict[str, ClusterSpec]
    folder: Path = field(default=TASKS_DIR)

    def get(self, name: str) -> TaskSpec:
        if name not in self.tasks:
            raise RegistryError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(self.tasks))}",
                                exit_code=USAGE)
        return self.tasks[name]

    def cluster(self, name: str) -> ClusterSpec:
        if name not in self.clusters:
            raise RegistryError(f"unknown cluster {name!r}; known clusters: {', '.join(self.clusters)}",
                                exit_code=USAGE)
        return self.clusters[name]

    def in_cluster(self, cluster: str) -> list[TaskSpec]:
        self.cluster(cluster)
        return [t for t in self.tasks.values() if t.cluster == cluster]

    def excluded_clusters(self, heldout: str) -> list[str]:
        """The held-out cluster and the clusters FLAN also leaves out with it."""
        return [heldout, *self.cluster(heldout).also_exclude]

    def training_tasks(self, heldout: str | None) -> list[TaskSpec]:
        """Every task outside the excluded clusters (all tasks when heldout is None or empty)."""
        excluded = set(self.excluded_clusters(heldout)) if heldout else set()
        return [t for t in self.tasks.values() if t.cluster not in excluded]


def _fail(path: Path, msg: str):
    raise RegistryError(f"{path}: {msg}")


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        _fail(path, f"not valid TOML: {e}")


def _parse_fields(path: Path, table) -> dict[str, FieldSpec]:
    if not isinstance(table, dict) or not table:
        _fail(path, "[fields] must list each field of a row as `name = \"type\"`")
    out = {}
    for name, typ in table.items():
        base = typ.rstrip("?") if isinstance(typ, str) else typ
        if base not in FIELD_TYPES:
            _fail(path, f"[fields] {name} = {typ!r}: accepted types are {', '.join(FIELD_TYPES)} "
                        "(append ? for a field that may be missing)")
        if name.endswith("_") or not name.isidentifier():
            _fail(path, f"[fields] {name!r}: field names are identifiers not ending in _ (kept for derived slots)")
        out[name] = FieldSpec(name, base, typ.endswith("?"))
    return out


def _require_field(path: Path, fields: dict[str, FieldSpec], name, where: str, types: tuple[str, ...]):
    if name not in fields:
        _fail(path, f"{where} = {name!r} is not in [fields] ({', '.join(fields)})")
    if fields[name].type not in types:
        _fail(path, f"{where} = {name!r} has type {fields[name].type}; expected {' or '.join(types)}")


def parse_task(path: Path, *, require_source: bool = True) -> TaskSpec:
    """One task file to a TaskSpec; every problem names the file and the key. The package's task files must say
    where their public data lives ([source]); a user's included task over its own files may leave it out."""
    d = _read_toml(path)
    known = {"name", "cluster", "paper_dataset", "kind", "metric", "data", "notes", "fields", "labels",
             "choices", "derived", "source"}
    unknown = set(d) - known
    if unknown:
        _fail(path, f"unknown keys {sorted(unknown)}; accepted: {', '.join(sorted(known))}")
    for key in ("name", "cluster", "paper_dataset", "kind", "metric"):
        if not isinstance(d.get(key), str) or not d[key]:
            _fail(path, f"`{key}` is missing; every task file needs name, cluster, paper_dataset, kind, metric")
    if d["kind"] not in KINDS:
        _fail(path, f"kind = {d['kind']!r}; accepted: {', '.join(KINDS)}")
    if d["metric"] not in METRICS:
        _fail(path, f"metric = {d['metric']!r}; accepted: {', '.join(METRICS)}")
    fields = _parse_fields(path, d.get("fields"))

    labels = choices = derived = None
    if d["kind"] == "cls":
        lb = d.get("labels")
        if not isinstance(lb, dict):
            _fail(path, "a cls task needs a [labels] table with field, values and options")
        _require_field(path, fields, lb.get("field"), "[labels] field", ("text", "float", "int"))
        values, options = lb.get("values"), lb.get("options")
        if not (isinstance(values, list) and isinstance(options, list)) or len(values) != len(options) \
                or len(options) < 2:
            _fail(path, "[labels] values and options must be lists of equal length (at least 2)")
        labels = LabelSpec(lb["field"], tuple(map(str, values)), tuple(map(str, options)), bool(lb.get("round")))
    elif "labels" in d:
        _fail(path, f"[labels] is only for kind = \"cls\" (this task is {d['kind']})")
    if d["kind"] == "mc":
        ch = d.get("choices")
        if not isinstance(ch, dict) or ("list" in ch) == ("fields" in ch) or ("label" in ch) == ("answer" in ch):
            _fail(path, "an mc task needs [choices] with one of list / fields, and one of label / answer")
        if "list" in ch:
            _require_field(path, fields, ch["list"], "[choices] list", ("list",))
        else:
            if not isinstance(ch["fields"], list) or len(ch["fields"]) < 2:
                _fail(path, "[choices] fields must list at least two option fields")
            for f in ch["fields"]:
                _require_field(path, fields, f, "[choices] fields item", ("text",))
        if "label" in ch:
            _require_field(path, fields, ch["label"], "[choices] label", ("int",))
        else:
            _require_field(path, fields, ch["answer"], "[choices] answer", ("text", "list"))
        choices = ChoiceSpec(ch.get("list"), tuple(ch.get("fields", ())), ch.get("label"), ch.get("answer"))
    elif "choices" in d:
        _fail(path, f"[choices] is only for kind = \"mc\" (this task is {d['kind']})")
    if "derived" in d:
        dv = d["derived"]
        if dv.get("generator") not in GENERATORS:
            _fail(path, f"[derived] generator = {dv.get('generator')!r}; accepted: {', '.join(GENERATORS)}")
        sizes = {k: v for k, v in dv.items() if k != "generator"}
        if set(sizes) - {"train", "validation"} or not all(isinstance(v, int) and v > 0 for v in sizes.values()):
            _fail(path, "[derived] sizes are `train = N` and `validation = N` with N > 0")
        derived = DerivedSpec(dv["generator"], sizes)
    elif not isinstance(d.get("data"), str):
        _fail(path, "`data` (the folder name under the data directory) is missing; derived tasks use [derived]")
    label_field = labels.field if labels else choices.label_field if choices else None
    try:
        origin = None if d.get("source") is None and not require_source else \
            parse_source(path, d.get("source"), fields, d["kind"], label_field)
    except SourceError as e:
        raise RegistryError(str(e)) from None
    return TaskSpec(name=d["name"], cluster=d["cluster"], paper_dataset=d["paper_dataset"], kind=d["kind"],
                    metric=d["metric"], fields=fields, source=path, data=d.get("data"), notes=d.get("notes", ""),
                    labels=labels, choices=choices, derived=derived, origin=origin)


def parse_clusters(path: Path) -> dict[str, ClusterSpec]:
    d = _read_toml(path)
    out = {name: ClusterSpec(name, t.get("title", name), tuple(t.get("also_exclude", ()))) for name, t in d.items()}
    for c in out.values():
        for other in c.also_exclude:
            if other not in out:
                _fail(path, f"[{c.name}] also_exclude names unknown cluster {other!r}; known: {', '.join(out)}")
    return out


def scan_registry(folder: Path = TASKS_DIR) -> Registry:
    """Read every task file of `folder` (sorted); duplicate names and unknown clusters are errors."""
    folder = Path(folder)
    clusters_path = folder / CLUSTERS_FILE
    if not clusters_path.is_file():
        raise RegistryError(f"{clusters_path}: cluster list missing; the registry folder needs {CLUSTERS_FILE}")
    clusters = parse_clusters(clusters_path)
    tasks: dict[str, TaskSpec] = {}
    for path in sorted(folder.glob("*.toml")):
        if path.name.startswith("_"):
            continue
        spec = parse_task(path)
        if spec.name in tasks:
            raise RegistryError(f"dataset {spec.name!r} is defined twice: {tasks[spec.name].source} and {path}")
        if spec.cluster not in clusters:
            _fail(path, f"cluster = {spec.cluster!r} is unknown; known clusters: {', '.join(clusters)}")
        tasks[spec.name] = spec
    return Registry(tasks, clusters, folder)


@lru_cache(maxsize=4)
def load_registry(folder: str | Path = TASKS_DIR) -> Registry:
    """The registry of `folder`, read once per process."""
    return scan_registry(Path(folder))
