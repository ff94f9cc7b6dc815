"""The one config tree: dataclasses loaded from a YAML recipe plus dotted `key=value` overrides.

Loading is strict: an unknown key, a value of the wrong type or a shape that cannot run at the requested
parallelism raises ConfigError naming the key, before any process or model is started. Torch-free.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError
from pipeline.model.config import ModelConfig
from pipeline.model.presets import PRESETS


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    # How long a collective may wait for the slowest rank before the job fails with an error (instead of
    # hanging): longer than rank 0 alone takes to build a dataset index or to write the largest checkpoint.
    timeout_minutes: float = 30.0


@dataclass
class DataConfig:
    tokenizer: str = ""  # a tokenizer directory (freelm tokenizer train / import)
    corpora: list[str] = field(default_factory=list)  # indexed-dataset prefixes (freelm data corpus --out)
    corpus_weights: list[float] | None = None  # blending weights, one per corpus (default: by size)
    teacher: str = ""  # a propositions prefix, e.g. data/teacher/train (freelm data tasks)
    seq_len: int | None = None  # language sample length (default: model.max_seq_len)
    teacher_seq_len: int | None = None  # propositions are cut to it from the input side (default: seq_len)
    num_workers: int = 1  # loader worker processes per stream
    # Teacher steps' propositions are drawn in windows of this many steps: each window is sorted by length and
    # cut into steps (and micro-batches) of similar length, little padded; the steps are shuffled (1: off).
    teacher_length_window: int = 64
    # The share of teacher propositions drawn from each task, by name (e.g. {sst2: 4, cola: 1}; 0 leaves one
    # out; every task of data.teacher named). None: as the data holds them.
    teacher_task_weights: dict[str, float] | None = None
    # True: a teacher step takes every candidate's proposition of each example it draws, side by side (the true
    # one beside the false ones: the head is shown what tells them apart, not the input alone).
    teacher_whole_examples: bool = False


@dataclass
class TrainConfig:
    run_dir: str = "runs/freelm"
    ds_config: str = "ds_configs/zero3_bf16.json"  # precision, ZeRO stage and offload live there
    steps: int = 1000  # optimizer steps, both signals together
    schedule: Literal["interactive", "mixed"] = "interactive"
    language_steps: int = 1  # interactive: N language steps, then
    teacher_steps: int = 1  # ... M teacher steps, repeated (0: a language-only baseline)
    language_weight: float = 1.0  # mixed: loss = w_l * language + w_t * teacher
    teacher_weight: float = 1.0
    micro_batch: int = 8  # language sequences per micro-step per data-parallel rank
    teacher_micro_batch: int = 32  # propositions per micro-step per data-parallel rank
    grad_accum: int = 1  # language micro-batches per step
    teacher_grad_accum: int = 1  # teacher micro-batches per step: few, large ones (each pays ZeRO's gathers)
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    save_every: int = 500
    checkpoints: bool = True  # False: never write a checkpoint (benchmarks, throw-away runs)
    keep_checkpoints: int = 3  # the newest N complete checkpoints stay, older ones are deleted (0: keep all)
    keep_every: int = 0  # ... except every K-th step's, kept for the record (0: none)
    log_every: int = 1
    exit_after: int | None = None  # stop (with a checkpoint) after this many steps in this job
    max_consecutive_skips: int = 10  # non-finite steps in a row before the run stops
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder block (regional compilation)
    init_from: str | None = None  # a local Hugging Face GPT-2/LLaMA directory to start from (teacher head fresh)
    init_teacher_task: int = 0  # init_from in the FreeLM authors' layout: the (binary) task whose head is the teacher's
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs, or a matmul measured on CPU


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under the run directory
    experiment: str = "freelm"
    run_name: str | None = None  # None: the run directory's name
    system_metrics: bool = True  # CPU / memory / GPU utilisation (MLflow's monitor; GPUs need nvidia-ml-py)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> Config:
        self.resolve_vocab()
        self.model.validate(self.parallel.tensor_parallel)
        train = self.train
        positive = ("steps", "language_steps", "micro_batch", "teacher_micro_batch", "grad_accum",
                    "teacher_grad_accum", "save_every", "log_every", "max_consecutive_skips")
        for key in positive:
            if getattr(train, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(train, key)}")
        if self.parallel.timeout_minutes <= 0:
            raise ConfigError(f"parallel.timeout_minutes must be > 0, got {self.parallel.timeout_minutes}")
        for key in ("keep_checkpoints", "keep_every"):
            if getattr(train, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0 (0: keep all / none), got {getattr(train, key)}")
        if train.teacher_steps < 0 or (train.teacher_steps == 0 and train.schedule == "mixed"):
            raise ConfigError(f"train.teacher_steps must be >= 1 (0 only with the interactive schedule: a "
                              f"language-only run), got {train.teacher_steps}")
        if self.data.teacher_length_window < 1:
            raise ConfigError(f"data.teacher_length_window must be >= 1 (1: no length grouping), got "
                              f"{self.data.teacher_length_window}")
        if self.data.seq_len is None:
            self.data.seq_len = self.model.max_seq_len
        if self.data.teacher_seq_len is None:
            self.data.teacher_seq_len = self.data.seq_len
        for key in ("seq_len", "teacher_seq_len"):
            if getattr(self.data, key) > self.model.max_seq_len:
                raise ConfigError(
                    f"data.{key} ({getattr(self.data, key)}) exceeds model.max_seq_len ({self.model.max_seq_len})"
                )
        weights = self.data.corpus_weights
        if weights is not None and len(weights) != len(self.data.corpora):
            raise ConfigError(
                f"data.corpus_weights has {len(weights)} entries for {len(self.data.corpora)} data.corpora"
            )
        return self

    def resolve_vocab(self) -> None:
        """`model.vocab_size` follows the tokenizer in `data.tokenizer` (when it exists yet). A pinned size is
        kept if the tokenizer fits its padded embedding (the size is then raised to the tokenizer's, which
        leaves the padded embedding as it was), else it is an error naming both numbers."""
        from pipeline.data.tokenizer import tokenizer_vocab_size

        model, path = self.model, self.data.tokenizer
        if not path or not Path(path).is_dir():
            return
        ids = tokenizer_vocab_size(path)
        if model.vocab_size is None:
            model.vocab_size = ids
            return
        if ids <= model.vocab_size:
            return
        padded = model.padded_vocab_size(self.parallel.tensor_parallel)
        if ids > padded:
            raise ConfigError(
                f"the tokenizer {path} has {ids} ids, more than the embedding of model.vocab_size={model.vocab_size} "
                f"(padded to {padded}) holds: remove model.vocab_size to follow the tokenizer, or raise it"
            )
        model.vocab_size = ids


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'d_model': 64}} -> {'model.d_model': 64}, e.g. for tracking params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML recipe (or start from defaults), apply `a.b=value` overrides, resolve the model preset,
    build the typed tree and validate it."""
    data = read_yaml_mapping(Path(path), "config") if path is not None else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        apply_override(data, key.strip(), yaml.safe_load(raw))
    model = data.get("model")
    if isinstance(model, dict) and model.get("preset") is not None:
        data["model"] = {**preset_fields(model["preset"]), **model}
    return build(Config, data, "").validate()


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: {}), with ConfigErrors naming the file."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return doc


def preset_fields(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def build(cls: type, data: Any, prefix: str) -> Any:
    """Construct dataclass `cls` from a mapping, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {name!r}; valid keys here: {', '.join(sorted(fields))}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = build(kind, value, f"{name}.")
        else:
            kwargs[key] = check_type(name, value, kind)
    return cls(**kwargs)


def check_type(name: str, value: Any, kind: Any) -> Any:
    """Return `value` if it fits annotation `kind` (ints and numeric strings are accepted as floats)."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    for option in options:
        origin = typing.get_origin(option)
        if option is type(None) and value is None:
            return value
        if origin is typing.Literal and value in typing.get_args(option):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):  # PyYAML reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool) and isinstance(value, option):
            return value
        container = origin or option
        if container in (list, dict) and isinstance(value, container):
            args = typing.get_args(option)
            if container is list and args:
                return [check_type(f"{name}[{i}]", item, args[0]) for i, item in enumerate(value)]
            if container is dict and args:
                return {key: check_type(f"{name}.{key}", item, args[1]) for key, item in value.items()}
            return value
    raise ConfigError(f"{name}: expected {describe(kind)}, got {value!r}")


def describe(kind: Any) -> str:
    if typing.get_origin(kind) is typing.Literal:
        return " or ".join(repr(v) for v in typing.get_args(kind))
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(describe(k) for k in typing.get_args(kind))
    return "null" if kind is type(None) else getattr(kind, "__name__", str(kind))
