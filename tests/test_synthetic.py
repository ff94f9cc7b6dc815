"""The demo's generated world: deterministic, balanced, declared in the project's task format, with one task
that has no train split."""

from __future__ import annotations

import collections
import filecmp

from pipeline.data.synthetic import generate
from pipeline.data.tasks import SplitStats, iter_propositions, load_tasks


def test_generate_is_deterministic_balanced_and_loadable(tmp_path):
    small = dict(corpus_mb=0.05, train_examples=200, dev_examples=40)
    one, again, other = (generate(tmp_path / name, seed=seed, **small)
                         for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    for path in (one.corpus, one.heldout, *sorted((one.root / "tasks").iterdir())):
        assert filecmp.cmp(path, again.root / path.relative_to(one.root), shallow=False)
    assert one.corpus.read_bytes() != other.corpus.read_bytes()

    specs = load_tasks(one.tasks_yaml)
    assert set(specs) == set(one.task_names) and set(one.trained_tasks) < set(one.task_names)
    for name, spec in specs.items():
        assert ("train" in spec.splits) == (name in one.trained_tasks)
        for split in spec.splits:
            props = list(iter_propositions(spec, split, SplitStats(), all_candidates=True))
            gold = collections.Counter(p.gold for p in props if p.label == 1)
            assert set(gold) == set(spec.label_names) and max(gold.values()) - min(gold.values()) <= 1
            assert all(p.proposition_text in spec.propositions.values() for p in props)
