"""The synthetic world of `freelm demo`: deterministic, balanced, valid tasks, usable by the real CLI, and honest:
the unseen task's text is nowhere in the training data, the corpus states no proposition, and a task's
candidates differ only in the label word, in as many tokens."""

from __future__ import annotations

import collections
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.synthetic import SyntheticData, generate
from pipeline.data.tasks import SplitStats, iter_propositions, load_tasks

SMALL = dict(corpus_mb=0.3, train_examples=400, dev_examples=60)
ROOT = Path(__file__).resolve().parents[1]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SyntheticData:
    return generate(tmp_path_factory.mktemp("synth"), **SMALL)


def test_same_seed_same_bytes_other_seed_differs(data, tmp_path):
    again = generate(tmp_path / "again", **SMALL)
    assert files(again.root) == files(data.root)
    generate(tmp_path / "again", **SMALL)  # overwriting is idempotent
    assert files(again.root) == files(data.root)
    other = files(generate(tmp_path / "other", seed=1, **SMALL).root)
    assert other.keys() == files(data.root).keys()
    assert all(other[name] != content for name, content in files(data.root).items() if name != "tasks.yaml")


def test_layout_sizes_and_api(data):
    assert data.corpus == data.root / "corpus.txt" and data.heldout == data.root / "heldout.txt"
    assert 0.3e6 <= data.corpus.stat().st_size < 0.31e6 and 1e5 <= data.heldout.stat().st_size < 1.01e5
    assert data.corpus.read_text() != data.heldout.read_text()
    assert set(data.trained_tasks) < set(data.task_names) and len(data.trained_tasks) >= 3


def test_tasks_yaml_loads_and_every_split_yields_propositions(data):
    specs = load_tasks(data.tasks_yaml)
    assert tuple(specs) == data.task_names
    for name, spec in specs.items():
        assert spec.files[spec.splits[0]].parent == (data.root / "tasks").resolve()
        assert spec.splits == (("train", "dev") if name in data.trained_tasks else ("dev",))
        assert all(p.endswith(f" {label}.") for label, p in spec.propositions.items())
        frames = {p.removesuffix(f" {label}.") for label, p in spec.propositions.items()}
        assert len(frames) == 1, f"{name}: candidates differ only in the label word"
        for split in spec.splits:
            stats = SplitStats()
            got = list(iter_propositions(spec, split, stats, all_candidates=True))
            n = SMALL["train_examples" if split == "train" else "dev_examples"]
            assert (stats.examples, stats.positives, stats.skipped) == (n, n, 0)
            assert len(got) == n * len(spec.label_names) and {p.candidate for p in got} == set(spec.label_names)
            assert all(p.input_text and p.proposition_text.startswith("Here, ") for p in got)


def test_labels_balanced_and_dev_inputs_not_in_train(data):
    specs = load_tasks(data.tasks_yaml)
    for name, spec in specs.items():
        split_rows = {split: rows(spec.files[split]) for split in spec.splits}
        for split, got in split_rows.items():
            counts = collections.Counter(row["label"] for row in got)
            assert set(counts) == set(spec.label_names)
            assert max(counts.values()) - min(counts.values()) <= 1, (name, split, counts)
        if "train" in split_rows:
            assert not {r["text"] for r in split_rows["dev"]} & {r["text"] for r in split_rows["train"]}


def test_unseen_task_has_only_a_dev_split(data):
    specs = load_tasks(data.tasks_yaml)
    unseen = [name for name in data.task_names if name not in data.trained_tasks]
    assert unseen and all(specs[name].splits == ("dev",) for name in unseen)
    assert not list((data.root / "tasks").glob(f"{unseen[0]}_train*"))


def seen_text(data: SyntheticData) -> str:
    """What the demo's model reads before the dev sets: the corpus, the held-out text and the train splits."""
    return "\n".join(p.read_text() for p in [data.corpus, data.heldout, *sorted(data.root.glob("tasks/*_train.tsv"))])


def test_unseen_task_text_is_nowhere_in_the_training_data(data):
    text, specs = seen_text(data), load_tasks(data.tasks_yaml)
    for name in set(data.task_names) - set(data.trained_tasks):
        inputs = [row["text"] for row in rows(specs[name].files["dev"])]
        assert len(inputs) == SMALL["dev_examples"] and not [i for i in inputs if i in text]
        assert not [p for p in specs[name].propositions.values() if p in text]


def test_corpus_states_no_proposition(data):
    """No candidate proposition of any task, so no (input, true proposition) statement either, is in the text
    the language signal reads."""
    text = data.corpus.read_text() + data.heldout.read_text()
    for spec in load_tasks(data.tasks_yaml).values():
        assert not [p for p in spec.propositions.values() if p in text]


def cli(*args: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_real_cli_prepares_both_streams(data, tmp_path):
    cli("tokenizer", "train", "--input", str(data.corpus), "--vocab-size", "1000", "--out", "tok", cwd=tmp_path)
    cli("data", "corpus", "--input", str(data.corpus), "--tokenizer", "tok", "--out", "lm", cwd=tmp_path)
    assert (tmp_path / "lm.bin").stat().st_size > 0 and (tmp_path / "lm.idx").exists()
    cli("data", "tasks", "--config", str(data.tasks_yaml), "--split", "train", "--tokenizer", "tok",
        "--out", "teacher", "--max-len", "64", cwd=tmp_path)
    summary = json.loads((tmp_path / "teacher" / "train.summary.json").read_text())["tasks"]
    assert set(summary) == set(data.trained_tasks)
    for name, task in summary.items():
        n = SMALL["train_examples"]
        assert (task["examples"], task["positives"], task["propositions"], task["truncated"]) == (n, n, 2 * n, 0)

    from pipeline.data.propositions import proposition_tail
    from pipeline.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "tok")
    for name, spec in load_tasks(data.tasks_yaml).items():  # candidates: as many tokens, one of them differs
        ids = [tok.encode(proposition_tail(p)) for p in spec.propositions.values()]
        assert len({len(i) for i in ids}) == 1, (name, ids)
        assert sum(len(set(column)) > 1 for column in zip(*ids)) == 1, (name, ids)
