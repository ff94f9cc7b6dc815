"""A small synthetic world for `freelm demo`: a raw-text corpus and labelled tasks, no downloads.

The world: two dozen people, foods, animals, vehicles, kinds of weather, places, numbers and adjectives
that are good or bad. A story (stories are separated by a blank line in `corpus.txt`) is a few lines of
plain sentences (someone walks somewhere, cooks, counts things) and facts the tasks rest on, in words of
their own: "Ada said the fox is a kind of animal.", "Ben ate the fresh cake and felt positive.", "Cleo saw
ten people at the park, a large group.". So the language signal can relate the words, but the corpus
holds no task proposition: LM likelihood has to score sentences it never saw. `heldout.txt` is more of the
same from another seed, for perplexity.

Tasks (TSV with a header, `text` and `label`; `tasks.yaml` declares them with `data_root: .`). Every
proposition is "Here, the <subject> is <label>.": a task's candidates differ only in the label word, whose
pieces the tests check are equally many, so no candidate stands out by its length.
  sentiment  positive | negative                 "The soup was fresh and tasty."       subject: review
  topic      food | animal | vehicle | weather   "The fox was hiding near the farm."   subject: topic
  count      small | large                       "Ada met two visitors at the park."   subject: crowd
  opinion    positive | negative (dev only)      "Ada found the bus awful and dull."   subject: opinion
The trained tasks draw their inputs from two or three sentence shapes each, so the teacher head has to
find the telling word wherever it is. `opinion` is never trained on: its sentence shape, what it judges
(places and vehicles) and its propositions occur nowhere in the corpus or the training splits; only its
adjectives (a subset of `sentiment`'s) and label words do. Its accuracy measures whether what the
teacher head learnt on `sentiment` transfers. Labels are balanced and no dev input is in train.

Learnable from scratch: neither a proposition's label word nor its input alone tells whether it is true
(an XOR), which keeps the `tiny` preset at chance for well over 1000 steps from its default init; with
`model.init_std: 0.2` (recipes/demo.yaml) it learns them within the demo's 1500 steps (in 500-1500 with the
seeds tried). The same seed writes the same bytes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PEOPLE = "Ada Ben Cleo Dan Eva Finn Gus Hana Ivo Jade Kai Lena Milo Nora Omar Pia Rosa Sam Tara Uma Vic Wes Zoe".split()
TOPICS = {
    "food": "soup bread cake rice pie apple pear cheese salad pasta stew fish plum melon carrot honey".split(),
    "animal": "cat dog horse rabbit fox owl goat duck mouse sheep frog bear deer pig hen crow wolf cow".split(),
    "vehicle": "bus train bike boat truck van car tram ship plane taxi scooter".split(),
    "weather": "rain snow wind fog storm sun hail frost thunder cloud".split(),
}
DOING = {"food": "cooking baking cooling".split(), "animal": "running sleeping hiding".split(),
         "vehicle": "moving parking leaving".split(), "weather": "coming starting clearing".split()}
PLACES = "park market school river forest beach farm village garden station library hill bridge lake museum".split()
THINGS = "hat kite ball cup coat bag bowl sock lamp chair".split()
COLOURS = "red blue green yellow black white brown pink grey orange".split()
NUMBERS = "two three four five six seven eight nine ten eleven twelve".split()
COUNTS = {"small": NUMBERS[:3], "large": NUMBERS[-4:]}
TIMES = "morning afternoon evening night".split()
ADJ = {"positive": "good lovely nice great fine".split(), "negative": "bad awful nasty poor dull".split()}
TASTY = {"positive": ADJ["positive"] + "tasty fresh sweet".split(),
         "negative": ADJ["negative"] + "stale rotten sour".split()}


def _sentiment(r: random.Random, label: str) -> str:
    a, b = r.sample(TASTY[label], 2)
    food, other = r.sample(TOPICS["food"], 2)
    return r.choice([f"The {food} was {a} and {b}.",
                     f"{r.choice(PEOPLE)} ate some {a} {food} at the {r.choice(PLACES)}.",
                     f"A {a} {food} and a {b} {other} were on the table."])


def _topic(r: random.Random, label: str) -> str:
    noun, doing, place = r.choice(TOPICS[label]), r.choice(DOING[label]), r.choice(PLACES)
    return r.choice([f"The {noun} was {doing} near the {place}.",
                     f"Near the {place}, {r.choice(PEOPLE)} saw the {noun} {doing}."])


def _count(r: random.Random, label: str) -> str:
    n, place = r.choice(COUNTS[label]), r.choice(PLACES)
    return r.choice([f"The {place} had {n} visitors in the {r.choice(TIMES)}.",
                     f"{r.choice(PEOPLE)} met {n} visitors at the {place}."])


def _opinion(r: random.Random, label: str) -> str:
    a, b = r.sample(ADJ[label], 2)
    return f"{r.choice(PEOPLE)} found the {r.choice(PLACES + TOPICS['vehicle'])} {a} and {b}."


@dataclass(frozen=True)
class _Task:
    make: Callable[[random.Random, str], str]  # (rng, label) -> an input text with that label
    subject: str                               # the proposition: "Here, the <subject> is <label>."
    labels: tuple[str, ...]                    # candidate order
    trained: bool = True

    @property
    def propositions(self) -> dict[str, str]:
        return {label: f"Here, the {self.subject} is {label}." for label in self.labels}


TASKS = {
    "sentiment": _Task(_sentiment, "review", ("positive", "negative")),
    "topic": _Task(_topic, "topic", tuple(TOPICS)),
    "count": _Task(_count, "crowd", tuple(COUNTS)),
    "opinion": _Task(_opinion, "opinion", ("positive", "negative"), trained=False),
}


def _plain(r: random.Random) -> str:
    """A sentence about what happens in the world."""
    who, place, time = r.choice(PEOPLE), r.choice(PLACES), r.choice(TIMES)
    return r.choice([
        f"{who} walked to the {place} with {r.choice(NUMBERS)} friends.",
        f"{who} took the {r.choice(COLOURS)} {r.choice(TOPICS['vehicle'])} to the {place} in the {time}.",
        f"A {r.choice(TOPICS['animal'])} followed {who} to the {place}.",
        f"{who} counted {r.choice(NUMBERS)} {r.choice(THINGS)}s at the {place}.",
        f"{who} cooked the {r.choice(TOPICS['food'])} for {r.choice(PEOPLE)} in the {time}.",
        f"There was {r.choice(TOPICS['weather'])} over the {place} all {time}.",
        f"{who} and {r.choice(PEOPLE)} found a {r.choice(THINGS)} near the {place}.",
        f"Here, the {place} is next to the {r.choice(PLACES)}.",
        f"{r.choice(NUMBERS).capitalize()} visitors came to the {place} in the {time}.",
    ])


def _fact(r: random.Random) -> str:
    """A fact the tasks rest on, in words of its own: what kind a thing is, which adjectives please, which
    numbers are small."""
    who = r.choice(PEOPLE)
    kind = r.choice(list(TOPICS))
    mood = r.choice(list(TASTY))
    size = r.choice(list(COUNTS))
    return r.choice([
        f"{who} said the {r.choice(TOPICS[kind])} is a kind of {kind}.",
        f"{who} ate the {r.choice(TASTY[mood])} {r.choice(TOPICS['food'])} and felt {mood}.",
        f"{who} saw {r.choice(COUNTS[size])} people at the {r.choice(PLACES)}, a {size} group.",
    ])


def story(r: random.Random) -> str:
    """3-8 lines, plain sentences and facts."""
    return "\n".join(_fact(r) if r.random() < 0.5 else _plain(r) for _ in range(r.randint(3, 8)))


def _write_text(path: Path, rng: random.Random, nbytes: int) -> None:
    stories, size = [], 0
    while size < nbytes:
        stories.append(story(rng))
        size += len(stories[-1]) + 1
    path.write_text("\n\n".join(stories) + "\n", encoding="utf-8", newline="\n")


def _write_split(path: Path, task: _Task, r: random.Random, n: int, avoid: set[str]) -> set[str]:
    """n examples, labels balanced, none in `avoid` (given up after 100 draws: the grammar ran out)."""
    labels = [task.labels[i % len(task.labels)] for i in range(n)]
    r.shuffle(labels)
    rows = []
    for label in labels:
        for _ in range(100):
            text = task.make(r, label)
            if text not in avoid:
                break
        rows.append(f"{text}\t{label}\n")
    path.write_text("text\tlabel\n" + "".join(rows), encoding="utf-8", newline="\n")
    return {row.split("\t")[0] for row in rows}


def _task_yaml(name: str, task: _Task, splits: list[str]) -> str:
    files = ", ".join(f"{s}: tasks/{name}_{s}.tsv" for s in splits)
    labels = ", ".join(f"{lab}: {lab}" for lab in task.labels)
    props = "".join(f"      {lab}: {json.dumps(p)}\n" for lab, p in task.propositions.items())  # JSON is YAML
    return (f"  {name}:\n    format: tsv\n    files: {{{files}}}\n    fields: [text, label]\n"
            f"    input: \"{{text}}\"\n    label: label\n    labels: {{{labels}}}\n    propositions:\n{props}"
            "    negatives_per_positive: 1\n")


@dataclass(frozen=True)
class SyntheticData:
    root: Path
    corpus: Path        # the file(s) to pass to build_corpus / tokenizer training
    heldout: Path
    tasks_yaml: Path
    task_names: tuple[str, ...]      # all tasks
    trained_tasks: tuple[str, ...]   # those with a train split


def generate(out_dir: str | Path, seed: int = 0, corpus_mb: float = 3.0, train_examples: int = 3000,
             dev_examples: int = 250) -> SyntheticData:
    """Write corpus.txt, heldout.txt, tasks/<task>_<split>.tsv and tasks.yaml under `out_dir` (overwriting)."""
    root = Path(out_dir)
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    _write_text(root / "corpus.txt", random.Random(f"{seed}/corpus"), int(corpus_mb * 1e6))
    _write_text(root / "heldout.txt", random.Random(f"{seed}/heldout"), 100_000)
    yaml = [f"# Synthetic tasks from pipeline/data/synthetic.py (seed {seed}); format: pipeline/data/tasks.py.\n"
            "data_root: .\ntasks:\n"]
    for name, task in TASKS.items():
        dev = _write_split(root / "tasks" / f"{name}_dev.tsv", task, random.Random(f"{seed}/{name}/dev"),
                           dev_examples, set())
        if task.trained:
            _write_split(root / "tasks" / f"{name}_train.tsv", task, random.Random(f"{seed}/{name}/train"),
                         train_examples, dev)
        yaml.append(_task_yaml(name, task, ["train", "dev"] if task.trained else ["dev"]))
    (root / "tasks.yaml").write_text("".join(yaml), encoding="utf-8", newline="\n")
    return SyntheticData(root, root / "corpus.txt", root / "heldout.txt", root / "tasks.yaml", tuple(TASKS),
                         tuple(name for name, task in TASKS.items() if task.trained))
