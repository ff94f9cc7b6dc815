"""Declarative teacher-signal tasks: labelled examples turned into true/false propositions.

A tasks YAML declares, per task, where the files are, how to read them and one proposition template
per label. Each labelled example yields one `Proposition` per candidate label: the gold one true
(label 1), the others false (0). Adding a task needs no code.

    data_root: ${FREELM_DATA:-../../shared/data}   # ${VAR} and ${VAR:-default}; relative to this file
    tasks:
      sst2:
        format: tsv            # tsv (tab-separated, quotes are plain text) | csv (standard quoting)
                               # | jsonl (one object per line) | regex (one example per line, `pattern`)
        header: true           # tsv/csv: the first row names the columns; false: `columns:` lists them
        encoding: utf-8        # the default (any ASCII-compatible codec); a leading BOM is dropped
        files: {train: tasks/glue/SST-2/train.tsv, dev: tasks/glue/SST-2/dev.tsv}  # under data_root
        fields: [sentence, label]       # the fields the task uses; templates may name only these
        input: "{sentence}"             # str.format template over the fields (all read as text)
        label: label                    # the field holding the raw label
        labels: {"0": negative, "1": positive}   # raw value -> label name; also the candidate order
        positive: positive              # two-label tasks: the class F1 is of (default: the label of raw value
                                        # "1", else the second declared; with `threshold`, at_or_above)
        propositions:                   # exactly one template per label name
          positive: "Here, the movie review is emotionally positive."
          negative: "Here, the movie review is emotionally negative."
        on_error: fail                  # fail: a bad row raises DataError | skip: count it, go on
        negatives_per_positive: null    # null keeps every false proposition; k keeps at most k

A `regex` task reads each line with `pattern` (a full match) whose named groups give the fields. A
regression task declares `threshold: {value: 3.0, at_or_above: similar, below: dissimilar}` instead
of `labels`. Blank lines are ignored. A bad declaration raises ConfigError naming `tasks.<name>.<key>`
before any data file is opened; a bad row raises DataError starting with `<file>:<line>:`.
"""

from __future__ import annotations

import codecs
import math
import os
import random
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import read_yaml_mapping
from pipeline.data.task_rows import RowError, records
from pipeline.errors import ConfigError, DataError

FORMATS = ("tsv", "csv", "jsonl", "regex")
_REQUIRED = object()
TASK_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {  # key: (accepted types, default)
    "format": ((str,), _REQUIRED), "files": ((dict,), _REQUIRED), "fields": ((list,), _REQUIRED),
    "input": ((str,), _REQUIRED), "label": ((str,), _REQUIRED), "propositions": ((dict,), _REQUIRED),
    "labels": ((dict,), None), "threshold": ((dict,), None), "header": ((bool,), True),
    "columns": ((list,), None), "pattern": ((str,), None), "encoding": ((str,), "utf-8"),
    "on_error": ((str,), "fail"), "negatives_per_positive": ((int, type(None)), None), "positive": ((str,), None),
}
FORMAT_ONLY_KEYS = {"header": ("tsv", "csv"), "columns": ("tsv", "csv"), "pattern": ("regex",)}
_ENV_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class Proposition:
    task: str
    example_id: int  # 0-based index of the example among the split's examples; groups its candidates
    input_text: str
    proposition_text: str
    candidate: str
    gold: str
    label: int  # 1 if candidate == gold else 0


@dataclass
class SplitStats:
    examples: int = 0
    propositions: int = 0
    positives: int = 0
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Threshold:
    value: float
    at_or_above: str
    below: str


@dataclass(frozen=True)
class TaskSpec:
    name: str
    format: str
    files: Mapping[str, Path]
    fields: tuple[str, ...]
    input: str
    label: str
    labels: Mapping[str, str] | None  # raw value -> label name; None when `threshold` binarises
    threshold: Threshold | None
    propositions: Mapping[str, str]
    header: bool = True
    columns: tuple[str, ...] | None = None
    pattern: re.Pattern[str] | None = None
    encoding: str = "utf-8"
    on_error: str = "fail"
    negatives_per_positive: int | None = None
    positive: str | None = None  # two-label tasks: the class F1 is of; None with more labels

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)

    @property
    def label_names(self) -> tuple[str, ...]:
        """Candidate label names in declared order."""
        if self.threshold is not None:
            return (self.threshold.at_or_above, self.threshold.below)
        return tuple(dict.fromkeys(self.labels.values()))


def load_tasks(path: str | Path, only: Sequence[str] | None = None) -> dict[str, TaskSpec]:
    """Parse and validate every task of a tasks YAML (no data file is read); return those in `only`."""
    path = Path(path)
    doc = read_yaml_mapping(path, "tasks")
    for key in doc:
        if key not in ("data_root", "tasks"):
            raise ConfigError(f"{path}: unknown key {key!r}; valid keys: data_root, tasks")
    root = (path.parent / _expand(str(doc.get("data_root") or "."), "data_root")).resolve()
    tasks = doc.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ConfigError(f"{path}: 'tasks' must be a non-empty mapping of task name to declaration")
    specs = {str(name): _parse_task(str(name), decl, root) for name, decl in tasks.items()}
    if only is None:
        return specs
    for name in only:
        if name not in specs:
            raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(specs)}")
    return {name: specs[name] for name in only}


def iter_propositions(spec: TaskSpec, split: str, stats: SplitStats, *, seed: int = 0,
                      negatives_per_positive: int | None = None,
                      all_candidates: bool = False) -> Iterator[Proposition]:
    """Stream the split's propositions in file order, updating `stats` as it goes.

    `negatives_per_positive` None takes the task's declared value; k keeps at most k false propositions
    per example, drawn by an RNG seeded with (seed, task, example_id). `all_candidates` keeps every one.
    The split and the file are checked now; rows are read lazily.
    """
    if split not in spec.files:
        raise ConfigError(f"tasks.{spec.name}: no split {split!r}; declared splits: {', '.join(spec.splits)}")
    path = spec.files[split]
    if not path.is_file():
        raise DataError(f"{path}: data file of tasks.{spec.name}.files.{split} not found")
    keep = None if all_candidates else (
        spec.negatives_per_positive if negatives_per_positive is None else negatives_per_positive)
    if keep is not None and (type(keep) is not int or keep < 0):
        raise ConfigError(f"negatives_per_positive: expected a non-negative int, got {keep!r}")
    return _propositions(spec, path, stats, seed, keep)


def _propositions(spec: TaskSpec, path: Path, stats: SplitStats, seed: int, keep: int | None) -> Iterator[Proposition]:
    example_id = 0
    for line, row in records(spec, path):
        try:
            if isinstance(row, RowError):
                raise row
            gold = _gold(spec, row)
        except RowError as err:
            if spec.on_error == "fail":
                raise DataError(f"{path}:{line}: {err}") from None
            stats.skipped += 1
            stats.skipped_reasons[str(err)] = stats.skipped_reasons.get(str(err), 0) + 1
            continue
        candidates = _candidates(spec.label_names, gold, keep, f"{seed}/{spec.name}/{example_id}")
        stats.examples += 1
        stats.positives += 1
        stats.propositions += len(candidates)
        input_text = spec.input.format_map(row).strip()
        for candidate in candidates:
            text = spec.propositions[candidate].format_map(row).strip()
            yield Proposition(spec.name, example_id, input_text, text, candidate, gold, int(candidate == gold))
        example_id += 1


def _candidates(names: tuple[str, ...], gold: str, keep: int | None, rng_seed: str) -> list[str]:
    """The gold label and at most `keep` others (all when None), in declared label order."""
    negatives = [name for name in names if name != gold]
    if keep is None or keep >= len(negatives):
        return list(names)
    kept = set(random.Random(rng_seed).sample(negatives, keep))
    return [name for name in names if name == gold or name in kept]


def _gold(spec: TaskSpec, row: dict[str, Any]) -> str:
    for name in spec.fields:
        if row.get(name) is None:
            raise RowError(f"missing field {name!r}")
    raw = row[spec.label]
    if spec.threshold is None:
        gold = spec.labels.get(str(raw).strip())
        if gold is None:
            raise RowError(f"unknown label {str(raw)!r}")
        return gold
    try:
        score = float(raw)
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        raise RowError(f"label {raw!r} is not a finite number")
    return spec.threshold.at_or_above if score >= spec.threshold.value else spec.threshold.below


# Parsing declarations -----------------------------------------------------------------------------------

def _expand(text: str, where: str) -> str:
    """Expand ${VAR} and ${VAR:-default} (the default also when VAR is empty, as in the shell)."""
    def value(match: re.Match[str]) -> str:
        name, default = match[1], match[2]
        found = os.environ.get(name)
        if not found and default is not None:
            return default
        if found is None:
            raise ConfigError(f"{where}: environment variable {name!r} is not set and has no default")
        return found
    return _ENV_VAR.sub(value, text)


def _get(decl: dict[str, Any], where: str, key: str, kinds: tuple[type, ...], default: Any = _REQUIRED) -> Any:
    if key not in decl:
        if default is _REQUIRED:
            raise ConfigError(f"{where}: missing required key {key!r}")
        return default
    value = decl[key]
    if type(value) not in kinds:
        expected = " or ".join("null" if kind is type(None) else kind.__name__ for kind in kinds)
        raise ConfigError(f"{where}.{key}: expected {expected}, got {value!r}")
    return value


def _one_of(value: str, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _names(values: list[Any], where: str) -> tuple[str, ...]:
    if not values or any(type(v) is not str for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"{where}: expected a non-empty list of distinct names, got {values!r}")
    return tuple(values)


def _parse_task(name: str, decl: Any, root: Path) -> TaskSpec:
    where = f"tasks.{name}"
    if not isinstance(decl, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {decl!r}")
    for key in decl:
        if key not in TASK_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(TASK_KEYS)}")
    d = {key: _get(decl, where, key, kinds, default) for key, (kinds, default) in TASK_KEYS.items()}
    fmt = _one_of(d["format"], FORMATS, f"{where}.format")
    for key, formats in FORMAT_ONLY_KEYS.items():
        if key in decl and fmt not in formats:
            raise ConfigError(f"{where}.{key}: only for format {' or '.join(formats)}, not {fmt}")
    fields = _names(d["fields"], f"{where}.fields")
    if d["label"] not in fields:
        raise ConfigError(f"{where}.label: field {d['label']!r} is not among the declared fields [{', '.join(fields)}]")
    if fmt in ("tsv", "csv") and d["header"] == (d["columns"] is not None):
        raise ConfigError(f"{where}.columns: required exactly when header is false")
    columns = None if d["columns"] is None else _names(d["columns"], f"{where}.columns")
    if columns is not None:
        _require_fields(fields, columns, f"{where}.columns", "column")
    try:
        codecs.lookup(d["encoding"])
    except LookupError:
        raise ConfigError(f"{where}.encoding: unknown encoding {d['encoding']!r}") from None
    if d["negatives_per_positive"] is not None and d["negatives_per_positive"] < 0:
        raise ConfigError(f"{where}.negatives_per_positive: must be >= 0 or null, got {d['negatives_per_positive']}")
    labels, threshold = _parse_labels(d, where)
    spec = TaskSpec(
        name=name, format=fmt, files=_parse_files(d["files"], f"{where}.files", root), fields=fields,
        input=_template(d["input"], fields, f"{where}.input"), label=d["label"], labels=labels,
        threshold=threshold, propositions=dict(d["propositions"]), header=d["header"], columns=columns,
        pattern=_parse_pattern(d["pattern"], fmt, fields, f"{where}.pattern"), encoding=d["encoding"],
        on_error=_one_of(d["on_error"], ("fail", "skip"), f"{where}.on_error"),
        negatives_per_positive=d["negatives_per_positive"],
    )
    _check_propositions(spec, f"{where}.propositions")
    return replace(spec, positive=_positive(spec, d["positive"], f"{where}.positive"))


def _parse_files(files: dict[Any, Any], where: str, root: Path) -> dict[str, Path]:
    if not files:
        raise ConfigError(f"{where}: expected a mapping of split name to path, got {files!r}")
    paths = {}
    for split, file in files.items():
        if type(file) is not str:
            raise ConfigError(f"{where}.{split}: expected a path, got {file!r}")
        paths[str(split)] = root / _expand(file, f"{where}.{split}")
    return paths


def _parse_labels(d: dict[str, Any], where: str) -> tuple[dict[str, str] | None, Threshold | None]:
    labels, threshold = d["labels"], d["threshold"]
    if (labels is None) == (threshold is None):
        raise ConfigError(f"{where}: declare exactly one of 'labels' (classes) or 'threshold' (a score)")
    if labels is not None:
        if not labels or any(type(name) is not str for name in labels.values()):
            raise ConfigError(f"{where}.labels: expected a mapping of raw value to label name, got {labels!r}")
        return {str(raw): name for raw, name in labels.items()}, None
    where = f"{where}.threshold"
    for key in threshold:
        if key not in ("value", "at_or_above", "below"):
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: value, at_or_above, below")
    value = _get(threshold, where, "value", (int, float))
    above, below = _get(threshold, where, "at_or_above", (str,)), _get(threshold, where, "below", (str,))
    if above == below:
        raise ConfigError(f"{where}: at_or_above and below must name different labels")
    return None, Threshold(float(value), above, below)


def _positive(spec: TaskSpec, declared: str | None, where: str) -> str | None:
    """The declared positive class of a two-label task, or its default; None for more labels."""
    names = spec.label_names
    if len(names) != 2:
        if declared is not None:
            raise ConfigError(f"{where}: only for tasks with two labels; this one has {len(names)}")
        return None
    if declared is not None:
        if declared not in names:
            raise ConfigError(f"{where}: {declared!r} is not a label name; labels: {', '.join(names)}")
        return declared
    if spec.threshold is not None:
        return spec.threshold.at_or_above
    return spec.labels.get("1", names[1])


def _check_propositions(spec: TaskSpec, where: str) -> None:
    """Exactly one template per label name, each naming only declared fields."""
    labels = spec.label_names
    for label in labels:
        if label not in spec.propositions:
            raise ConfigError(f"{where}: no template for label {label!r}")
    for label, template in spec.propositions.items():
        if label not in labels:
            raise ConfigError(f"{where}.{label}: not a label name; labels: {', '.join(labels)}")
        if type(template) is not str:
            raise ConfigError(f"{where}.{label}: expected str, got {template!r}")
        _template(template, spec.fields, f"{where}.{label}")


def _parse_pattern(source: str | None, fmt: str, fields: tuple[str, ...], where: str) -> re.Pattern[str] | None:
    if fmt != "regex":
        return None
    if source is None:
        raise ConfigError(f"{where}: required for format regex")
    try:
        pattern = re.compile(source)
    except re.error as err:
        raise ConfigError(f"{where}: not a valid regular expression: {err}") from None
    _require_fields(fields, tuple(pattern.groupindex), where, "named group")
    return pattern


def _require_fields(fields: tuple[str, ...], available: tuple[str, ...], where: str, what: str) -> None:
    for name in fields:
        if name not in available:
            raise ConfigError(f"{where}: no {what} for declared field {name!r} (has: {', '.join(available)})")


def _template(template: str, fields: tuple[str, ...], where: str) -> str:
    """Return `template` once it names only declared fields and formats text without error."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigError(f"{where}: not a valid template: {err}") from None
    for name in names:
        if name not in fields:
            raise ConfigError(
                f"{where}: template names field {name!r}, not among the declared fields [{', '.join(fields)}]")
    try:
        template.format_map(dict.fromkeys(fields, ""))
    except ValueError as err:
        raise ConfigError(f"{where}: not a valid template: {err}") from None
    return template
