"""A small synthetic world for `freelm demo`: a raw-text corpus and labelled tasks, no downloads.

The world: two dozen people, foods, animals, vehicles, kinds of weather, places, things, colours, numbers,
and adjectives that are good or bad. A story (stories are separated by a blank line in `corpus.txt`) is a
few lines from a small grammar: plain sentences (someone walks somewhere, cooks, counts things) and the
sentences the tasks ask about, most of them followed by their true proposition ("The soup was fresh and
tasty. Here, the review is positive."), so the language signal alone relates the words to the labels.
`heldout.txt` is more of the same from another seed, for perplexity.

Tasks (TSV with a header, `text` and `label`; `tasks.yaml` declares them with `data_root: .`):
  sentiment  positive | negative                 "The soup was fresh and tasty."   "Here, the review is positive."
  topic      food | animal | vehicle | weather   "The fox was hiding near the farm."
                                                 "Here, the sentence is about an animal."
  count      few | many                          "The park had two visitors in the morning."
                                                 "Here, there were only a few visitors."
  opinion    positive | negative (dev only)      "The bus was awful and dull."
                                                 "Here, the opinion is negative, not positive."
`opinion` is never trained on: it judges places and vehicles, not food, with other words in its
propositions, so its accuracy measures zero-shot transfer from `sentiment`. Labels are balanced and no dev
input is in train. Learnable from scratch: a task's inputs share one template of fixed length in tokens
(every word is one piece of a tokenizer trained on the corpus; the label shows only in the cue words), and
its propositions differ in length, so learned positions tell the candidates apart at the last token. The
`tiny` preset (recipes/tiny.yaml) then reaches ~1.0 on the trained tasks in about 1000 steps (it is still
at chance at 300); with same-length propositions, inputs of varying shape or no propositions in the corpus
it stalls near chance for longer. The same seed writes the same bytes.
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
ABOUT = {"food": "food", "animal": "an animal", "vehicle": "a kind of vehicle", "weather": "what the weather is like"}
PLACES = "park market school river forest beach farm village garden station library hill bridge lake museum".split()
THINGS = "hat kite ball cup coat bag bowl sock lamp chair".split()
COLOURS = "red blue green yellow black white brown pink grey orange".split()
NUMBERS = "two three four five six seven eight nine ten eleven twelve".split()
COUNTS = {"few": NUMBERS[:3], "many": NUMBERS[-4:]}
TIMES = "morning afternoon evening night".split()
GOOD = "good lovely nice great fine".split()  # said of anything; TASTY adds words for food
BAD = "bad awful nasty poor dull".split()
ADJ = {"positive": GOOD, "negative": BAD}
TASTY = {"positive": GOOD + "tasty fresh sweet".split(), "negative": BAD + "stale rotten sour".split()}


def _sentiment(r: random.Random, label: str) -> str:
    a, b = r.sample(TASTY[label], 2)
    return f"The {r.choice(TOPICS['food'])} was {a} and {b}."


def _topic(r: random.Random, label: str) -> str:
    return f"The {r.choice(TOPICS[label])} was {r.choice(DOING[label])} near the {r.choice(PLACES)}."


def _count(r: random.Random, label: str) -> str:
    return f"The {r.choice(PLACES)} had {r.choice(COUNTS[label])} visitors in the {r.choice(TIMES)}."


def _opinion(r: random.Random, label: str) -> str:
    a, b = r.sample(ADJ[label], 2)
    return f"The {r.choice(PLACES + TOPICS['vehicle'])} was {a} and {b}."


@dataclass(frozen=True)
class _Task:
    make: Callable[[random.Random, str], str]  # (rng, label) -> an input text with that label
    propositions: dict[str, str]               # label -> proposition, in candidate order
    trained: bool = True


def _polar(subject: str) -> dict[str, str]:  # the two differ in length: see the module docstring
    return {"positive": f"Here, {subject} is positive.", "negative": f"Here, {subject} is negative, not positive."}


TASKS = {
    "sentiment": _Task(_sentiment, _polar("the review")),
    "topic": _Task(_topic, {t: f"Here, the sentence is about {about}." for t, about in ABOUT.items()}),
    "count": _Task(_count, {"few": "Here, there were only a few visitors.", "many": "Here, there were many visitors."}),
    "opinion": _Task(_opinion, _polar("the opinion"), trained=False),
}


def _plain(r: random.Random) -> str:
    """A sentence of the world that no task asks about."""
    who, place, time = r.choice(PEOPLE), r.choice(PLACES), r.choice(TIMES)
    return r.choice([
        f"{who} walked to the {place} with {r.choice(NUMBERS)} friends.",
        f"{who} took the {r.choice(COLOURS)} {r.choice(TOPICS['vehicle'])} to the {place} in the {time}.",
        f"A {r.choice(TOPICS['animal'])} followed {who} to the {place}.",
        f"{who} counted {r.choice(NUMBERS)} {r.choice(THINGS)}s at the {place}.",
        f"{who} cooked the {r.choice(TOPICS['food'])} for {r.choice(PEOPLE)} in the {time}.",
        f"There was {r.choice(TOPICS['weather'])} over the {place} all {time}.",
    ])


def story(r: random.Random) -> str:
    """3-8 lines: plain sentences and task inputs, most inputs followed by their true proposition."""
    lines = []
    for _ in range(r.randint(3, 8)):
        if r.random() < 0.35:
            lines.append(_plain(r))
            continue
        task = TASKS[r.choice(list(TASKS))]
        label = r.choice(list(task.propositions))
        text = task.make(r, label)
        lines.append(f"{text} {task.propositions[label]}" if r.random() < 0.8 else text)
    return "\n".join(lines)


def _write_text(path: Path, rng: random.Random, nbytes: int) -> None:
    stories, size = [], 0
    while size < nbytes:
        stories.append(story(rng))
        size += len(stories[-1]) + 1
    path.write_text("\n\n".join(stories) + "\n", encoding="utf-8", newline="\n")


def _write_split(path: Path, task: _Task, r: random.Random, n: int, avoid: set[str]) -> set[str]:
    """n examples, labels balanced, none in `avoid` (given up after 100 draws: the grammar ran out)."""
    names = list(task.propositions)
    labels = [names[i % len(names)] for i in range(n)]
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
    labels = ", ".join(f"{lab}: {lab}" for lab in task.propositions)
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
