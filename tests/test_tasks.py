"""Declarative tasks: the shipped recipe on the real files, and the errors bad files and declarations get."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import SHARED_DATA
from pipeline.data.tasks import SplitStats, iter_propositions, load_tasks
from pipeline.errors import ConfigError, DataError

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tasks.yaml"

# (task, split, examples, candidates per example, header rows in the file)
SHIPPED = [
    ("sst2", "train", 67349, 2, 1), ("sst2", "dev", 872, 2, 1),
    ("cola", "train", 8551, 2, 0), ("cola", "dev", 1043, 2, 0),
    ("mrpc", "train", 3668, 2, 1), ("mrpc", "dev", 408, 2, 1),
    ("stsb", "train", 5749, 2, 1), ("stsb", "dev", 1500, 2, 1),
    ("rte", "train", 2490, 2, 1), ("rte", "dev", 277, 2, 1),
    ("wnli", "train", 635, 2, 1), ("wnli", "dev", 71, 2, 1),
    ("mnli", "dev", 9815, 3, 0), ("mnli", "dev_mismatched", 9832, 3, 0),
    ("qnli", "dev", 5463, 2, 0), ("qqp", "dev", 10000, 2, 0),
    ("trec", "train", 5452, 6, 0), ("trec", "dev", 500, 6, 0),
    ("ag_news", "dev", 7600, 4, 0), ("movie_reviews", "dev", 2000, 2, 0),
]


@pytest.fixture
def tasks(monkeypatch):
    monkeypatch.delenv("FREELM_DATA", raising=False)
    return load_tasks(RECIPE)


def read(spec, split, **kwargs):
    stats = SplitStats()
    return list(iter_propositions(spec, split, stats, **kwargs)), stats


def task(drop: tuple[str, ...] = (), **changes) -> dict:
    """A sentence/label TSV task declaration over `data.txt`, with keys changed or dropped."""
    decl = {
        "format": "tsv", "files": {"dev": "data.txt"}, "fields": ["sentence", "label"], "input": "{sentence}",
        "label": "label", "labels": {"0": "negative", "1": "positive"},
        "propositions": {"negative": "It is negative.", "positive": "It is positive."},
    }
    return {key: value for key, value in {**decl, **changes}.items() if key not in drop}


PROPOSITIONS = task()["propositions"]
JSONL = task(format="jsonl")
STS = task(drop=("labels",), threshold={"value": 3, "at_or_above": "positive", "below": "negative"})
REGEX = task(format="regex", pattern=r"(?P<label>\d) (?P<sentence>.+)")


def load(folder: Path, decl: dict, data: str | bytes | None = None):
    """Write the declaration as task `t` (and `data` as data.txt) into `folder`; load task `t`."""
    if data is not None:
        (folder / "data.txt").write_bytes(data if isinstance(data, bytes) else data.encode())
    (folder / "tasks.yaml").write_text(yaml.safe_dump({"data_root": ".", "tasks": {"t": decl}}))
    return load_tasks(folder / "tasks.yaml")["t"]


def test_recipe_declares_every_task_and_split(tasks):
    assert {(name, split) for name, split, *_ in SHIPPED} == {(t.name, s) for t in tasks.values() for s in t.splits}
    assert tasks["sst2"].files["dev"] == SHARED_DATA / "tasks/glue/SST-2/dev.tsv"
    assert tasks["trec"].label_names == ("abbreviation", "description", "entity", "human", "location", "number")


@pytest.mark.parametrize("name, split, examples, candidates, header", SHIPPED, ids=[f"{t}-{s}" for t, s, *_ in SHIPPED])
def test_every_example_of_every_split_yields_one_true_proposition(tasks, name, split, examples, candidates, header):
    spec = tasks[name]
    with open(spec.files[split], "rb") as f:
        assert sum(1 for line in f if line.strip()) - header == examples  # one row per line in these files
    props, stats = read(spec, split)
    assert (stats.examples, stats.propositions, stats.positives, stats.skipped) == (
        examples, examples * candidates, examples, 0)
    assert len(spec.label_names) == candidates
    true_per_example = [0] * examples
    for p in props:
        assert p.label == int(p.candidate == p.gold) and p.input_text and p.proposition_text
        true_per_example[p.example_id] += p.label
    assert true_per_example == [1] * examples


def test_real_file_quirks(tasks):
    sst2, _ = read(tasks["sst2"], "dev")
    assert sst2[1].input_text == "it 's a charming and often affecting journey ."
    assert (sst2[1].candidate, sst2[1].proposition_text, sst2[1].label) == (
        "positive", "Here, the movie review is emotionally positive.", 1)
    mrpc, _ = read(tasks["mrpc"], "dev")  # BOM before the header; a raw quote opening the second sentence
    assert mrpc[0].gold == "equivalent"
    assert 'Sentence 2: "The foodservice pie business does not fit' in mrpc[0].input_text
    cola, _ = read(tasks["cola"], "dev")  # headerless
    assert (cola[0].input_text, cola[0].gold) == ("The sailors rode the breeze clear of the rocks.", "acceptable")
    trec, _ = read(tasks["trec"], "train")  # Latin-1 byte 0xf0 on line 66
    assert any("sister\u00f0city" in p.input_text for p in trec)
    assert (trec[0].input_text, trec[0].gold) == ("How did serfdom develop in and then leave Russia ?", "description")
    news, _ = read(tasks["ag_news"], "dev")  # CSV quoting
    assert news[0].input_text.startswith("Headline: Fears for T N pension after talks Article: Unions")
    assert news[0].gold == "business"


def test_stsb_is_binarised_at_the_threshold(tasks):
    props, stats = read(tasks["stsb"], "dev")
    with open(tasks["stsb"].files["dev"]) as f:
        scores = [float(line.rstrip("\n").split("\t")[-1]) for line in list(f)[1:]]
    gold = [p.gold for p in props if p.label]
    assert gold == ["similar" if s >= 3.0 else "dissimilar" for s in scores]
    assert 3.0 in scores and gold.count("similar") == 629


def test_negative_subsampling_is_deterministic_and_keeps_every_positive(tasks):
    mnli = tasks["mnli"]
    one, stats = read(mnli, "dev", seed=7, negatives_per_positive=1)
    assert (stats.examples, stats.propositions, stats.positives) == (9815, 2 * 9815, 9815)
    assert sum(p.label for p in one) == 9815
    assert one == read(mnli, "dev", seed=7, negatives_per_positive=1)[0]
    assert one != read(mnli, "dev", seed=8, negatives_per_positive=1)[0]
    only_true, _ = read(mnli, "dev", negatives_per_positive=0)
    assert all(p.label for p in only_true) and len(only_true) == 9815


def test_declared_negatives_and_all_candidates(tmp_path):
    three_way = task(labels={"0": "negative", "1": "positive", "2": "neutral"}, negatives_per_positive=1,
                     propositions={**PROPOSITIONS, "neutral": "It is neutral."})
    spec = load(tmp_path, three_way, "sentence\tlabel\na\t0\nb\t2\n")
    assert len(read(spec, "dev")[0]) == 4
    assert len(read(spec, "dev", all_candidates=True)[0]) == 6
    assert len(read(spec, "dev", negatives_per_positive=2)[0]) == 6


def test_split_and_file_errors(tasks, tmp_path):
    with pytest.raises(ConfigError, match="tasks.qnli: no split 'train'; declared splits: dev"):
        iter_propositions(tasks["qnli"], "train", SplitStats())
    spec = load(tmp_path, task())
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/data.txt: data file of tasks.t.files.dev not found")):
        iter_propositions(spec, "dev", SplitStats())
    with pytest.raises(ConfigError, match="unknown task 'sst3'; known tasks: sst2, cola"):
        load_tasks(RECIPE, only=["sst3"])
    assert list(load_tasks(RECIPE, only=["trec", "sst2"])) == ["trec", "sst2"]


def test_data_root_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FREELM_DATA", str(tmp_path))
    assert load_tasks(RECIPE)["sst2"].files["dev"] == tmp_path / "tasks/glue/SST-2/dev.tsv"


# Bad rows: a DataError at file:line, or skipped and counted with on_error: skip -------------------------

BAD_ROWS = [
    (task(), "sentence\tlabel\nfine\t1\nno label here\n", "3: expected 2 columns, got 1"),
    (task(), "sentence\tlabel\nfine\t1\nodd\t3\n", "3: unknown label '3'"),
    (task(), b"sentence\tlabel\nfine\t1\ncaf\xe9\t1\n", "3: cannot decode byte 0xe9 as utf-8"),
    (JSONL, '{"sentence": "fine", "label": 1}\n{"sentence": "cut", "label": }\n', "2: invalid JSON: Expecting value"),
    (JSONL, '{"sentence": "fine", "label": 1}\n\n{"label": 0}\n', "3: missing field 'sentence'"),
    (JSONL, '{"sentence": "fine", "label": 1}\n[1, 2]\n', "2: expected a JSON object"),
    (STS, "sentence\tlabel\nfine\t4.5\nodd\tn/a\n", "3: label 'n/a' is not a finite number"),
    (REGEX, "1 fine\nno digit first\n", "2: line does not match the task's pattern"),
]
ROW_IDS = [problem.split(": ", 1)[1] for *_, problem in BAD_ROWS]


@pytest.mark.parametrize("decl, data, problem", BAD_ROWS, ids=ROW_IDS)
def test_bad_row_raises_data_error_at_its_line(tmp_path, decl, data, problem):
    spec = load(tmp_path, decl, data)
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path}/data.txt:{problem}")):
        read(spec, "dev")


@pytest.mark.parametrize("decl, data, problem", BAD_ROWS, ids=ROW_IDS)
def test_bad_row_is_skipped_and_counted(tmp_path, decl, data, problem):
    props, stats = read(load(tmp_path, {**decl, "on_error": "skip"}, data), "dev")
    assert (stats.examples, stats.propositions, stats.skipped, len(props)) == (1, 2, 1, 2)
    assert stats.skipped_reasons == {problem.split(": ", 1)[1]: 1}
    assert props[0].input_text == "fine" and props[0].example_id == 0


def test_crlf_and_quotes_in_tsv(tmp_path):
    props, _ = read(load(tmp_path, task(), 'sentence\tlabel\r\nsay "hi\t1\r\n'), "dev")
    assert props[1].input_text == 'say "hi' and props[1].label == 1


def test_csv_lines_are_physical_lines(tmp_path):
    decl = task(format="csv", header=False, columns=["sentence", "label"])
    spec = load(tmp_path, decl, 'a,1\n"two\nlines",0\nodd,9\n')
    with pytest.raises(DataError, match=r"data.txt:4: unknown label '9'"):
        read(spec, "dev")


def test_header_without_a_declared_field_is_a_data_error(tmp_path):
    spec = load(tmp_path, task(), "text\tlabel\na\t1\n")
    with pytest.raises(DataError, match="data.txt:1: header has no column 'sentence'"):
        read(spec, "dev")


# Bad declarations: ConfigError naming the task and key, before any data file is read --------------------

BAD_DECLARATIONS = [
    (task(propositions={**PROPOSITIONS, "positive": "{sentense} is positive."}),
     r"tasks.t.propositions.positive: template names field 'sentense', "
     r"not among the declared fields \[sentence, label\]"),
    (task(input="{sentence"), "tasks.t.input: not a valid template"),
    (task(input="{sentence:d}"), "tasks.t.input: not a valid template: Unknown format code 'd'"),
    (task(inputs="{sentence}"), "tasks.t: unknown key 'inputs'"),
    (task(drop=("input",)), "tasks.t: missing required key 'input'"),
    (task(propositions={"positive": "It is positive."}), "tasks.t.propositions: no template for label 'negative'"),
    (task(propositions={**PROPOSITIONS, "neutral": "x"}), "tasks.t.propositions.neutral: not a label name"),
    (task(label="score"), "tasks.t.label: field 'score' is not among the declared fields"),
    (task(format="xml"), "tasks.t.format: expected one of tsv, csv, jsonl, regex, got 'xml'"),
    (task(header=False), "tasks.t.columns: required exactly when header is false"),
    (task(header=False, columns=["label"]), "tasks.t.columns: no column for declared field 'sentence'"),
    (task(format="jsonl", header=True), "tasks.t.header: only for format tsv or csv"),
    (task(pattern="x"), "tasks.t.pattern: only for format regex"),
    ({**REGEX, "pattern": r"(\d) (?P<sentence>.+)"}, "tasks.t.pattern: no named group for declared field 'label'"),
    ({**STS, "labels": {"0": "negative"}}, "tasks.t: declare exactly one of 'labels'"),
    ({**STS, "threshold": {"value": "high", "at_or_above": "positive", "below": "negative"}},
     "tasks.t.threshold.value: expected int or float, got 'high'"),
    ({**STS, "threshold": {"value": 3, "step": 1}}, "tasks.t.threshold: unknown key 'step'"),
    (task(on_error="ignore"), "tasks.t.on_error: expected one of fail, skip, got 'ignore'"),
    (task(negatives_per_positive=-1), "tasks.t.negatives_per_positive: must be >= 0"),
    (task(encoding="klingon"), "tasks.t.encoding: unknown encoding 'klingon'"),
    (task(files={"dev": "${NO_SUCH_VAR_FOR_TESTS}/x"}),
     "tasks.t.files.dev: environment variable 'NO_SUCH_VAR_FOR_TESTS' is not set"),
]


@pytest.mark.parametrize("decl, message", BAD_DECLARATIONS, ids=range(len(BAD_DECLARATIONS)))
def test_bad_declaration_raises_config_error_naming_the_key(tmp_path, decl, message):
    decl = {**decl, "files": {split: f"nowhere/{file}" for split, file in decl["files"].items()}}  # never read
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, decl)


def test_unknown_top_level_key(tmp_path):
    (tmp_path / "tasks.yaml").write_text("data_root: .\ntask: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'task'; valid keys: data_root, tasks"):
        load_tasks(tmp_path / "tasks.yaml")
