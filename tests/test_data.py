"""Tokenizer, language corpus, blended samples, tokenized propositions and resumable loaders, on the real
files in ../shared/data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from distributed import run_ranks

GUTENBERG = SHARED_DATA / "lm" / "gutenberg_nltk"
TASKS_YAML = Path(__file__).resolve().parents[1] / "recipes" / "tasks.yaml"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from pipeline.data.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("tok")
    train_sentencepiece([GUTENBERG / "austen-emma.txt", GUTENBERG / "blake-poems.txt"], out, vocab_size=2000)
    return out


@pytest.fixture(scope="module")
def corpora(tok_dir, tmp_path_factory):
    from pipeline.data.corpus import build_corpus

    out = tmp_path_factory.mktemp("corpus")
    build_corpus([str(GUTENBERG / "blake-poems.txt"), str(GUTENBERG / "shakespeare-macbeth.txt")], tok_dir, out / "a")
    build_corpus([str(SHARED_DATA / "lm" / "tinyshakespeare" / "input.txt")], tok_dir, out / "b", workers=1)
    return out


def test_tokenizer_round_trip_with_special_tokens(tok_dir):
    from pipeline.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    assert json.loads((tok_dir / "freelm_tokenizer.json").read_text())["kind"] == "sentencepiece"
    text = "It was  a dark\r\nnight, naïve café ★ [sep] Here, the review is positive. [cls]"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids.count(tok.special.sep) == 1 and ids[-1] == tok.special.cls
    assert len({tok.special.pad, tok.special.eos, tok.special.sep, tok.special.cls}) == 4
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_hf_gpt2_tokenizer_gets_the_special_tokens(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    from pipeline.data.tokenizer import HFTokenizer, load_tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(GUTENBERG / "blake-poems.txt")], vocab_size=500, special_tokens=["<|endoftext|>"])
    eos = "<|endoftext|>"
    GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=eos, bos_token=eos, unk_token=eos).save_pretrained(
        tmp_path / "gpt2")
    tok = load_tokenizer(tmp_path / "gpt2")
    assert isinstance(tok, HFTokenizer) and tok.special.eos == 0
    ids = tok.encode("the tyger [sep] it burns. [cls]")
    assert ids.count(tok.special.sep) == 1 and ids[-1] == tok.special.cls
    assert tok.vocab_size == 503  # pad, [sep], [cls] added
    texts = ["the tyger [sep] it burns. [cls]", "", "Tyger Tyger, burning bright\nIn the forests of the night"]
    assert tok.encode_batch(texts) == [tok.tok.encode(t, add_special_tokens=False) for t in texts]
    tok.save(tmp_path / "imported")
    imported = load_tokenizer(tmp_path / "imported")  # through `tokenizers` alone
    assert imported.tok is None and (imported.special, imported.vocab_size) == (tok.special, tok.vocab_size)
    assert imported.encode_batch(texts) == tok.encode_batch(texts)
    assert imported.decode(tok.encode(texts[2])) == tok.decode(tok.encode(texts[2])) == texts[2]
    imported.save(tmp_path / "again")
    assert load_tokenizer(tmp_path / "again").encode_batch(texts) == tok.encode_batch(texts)

    # A tokenizer whose pad is its eos (as many LLaMA ones): pad gets an id of its own, kept when reloaded.
    GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=eos, bos_token=eos, unk_token=eos,
                      pad_token=eos).save_pretrained(tmp_path / "pad-is-eos")
    tok = load_tokenizer(tmp_path / "pad-is-eos")
    assert tok.special.eos == 0 and tok.special.pad == 500 and tok.vocab_size == 503
    tok.save(tmp_path / "pad-is-eos-imported")
    assert load_tokenizer(tmp_path / "pad-is-eos-imported").special.pad == 500


def test_corpus_is_a_megatron_indexed_dataset_with_every_token(tok_dir, corpora, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from pipeline.data.corpus import build_corpus
    from pipeline.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    files = [GUTENBERG / "blake-poems.txt", GUTENBERG / "shakespeare-macbeth.txt"]
    expected = [tok.encode(f.read_text(encoding="utf-8")) + [tok.special.eos] for f in files]
    ds = IndexedDataset(str(corpora / "a"))
    assert len(ds) == 2
    assert [ds[i].tolist() for i in range(2)] == expected
    # JSONL: one document per line, the text field configurable; two workers write the same bytes as one.
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t}) for t in ["one doc", "two [sep] docs", "three"]) + "\n")
    for workers in (1, 2):
        stats = build_corpus([str(jsonl), str(files[0])], tok_dir, tmp_path / f"w{workers}", "body", workers)
        assert stats.documents == 4
    assert (tmp_path / "w1.bin").read_bytes() == (tmp_path / "w2.bin").read_bytes()
    written = IndexedDataset(str(tmp_path / "w1"))  # keep it alive: items are views into its mmap
    assert written[1].tolist() == tok.encode("two [sep] docs") + [tok.special.eos]


def test_corpus_errors_name_the_file_and_line(tok_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "unterminated\n')
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "corpus", "--input", str(bad),
                          "--tokenizer", str(tok_dir), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert out.returncode == 2 and f"{bad}:2: invalid JSON" in out.stderr


def test_blended_samples_are_deterministic_per_seed(tok_dir, corpora, tmp_path, parallel_1):
    from pipeline.data.lm_dataset import language_dataset
    from pipeline.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)

    def build(seed: int, cache: str):
        return language_dataset([corpora / "a", corpora / "b"], [0.25, 0.75], 32, 400, tok, seed, tmp_path / cache)

    first, again, other = build(1, "c1"), build(1, "c2"), build(2, "c3")
    assert len(first) >= 400
    sample = first[7]
    assert sample["tokens"].shape == (32,) and torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    same = all(torch.equal(first[i]["tokens"], again[i]["tokens"]) for i in range(400))
    differs = any(not torch.equal(first[i]["tokens"], other[i]["tokens"]) for i in range(50))
    assert same and differs
    share_b = np.mean([first.dataset_index[i] == 1 for i in range(400)])
    assert abs(share_b - 0.75) < 0.02


def test_sst2_dev_propositions(tok_dir, tmp_path):
    from pipeline.data.propositions import PropositionDataset, build_propositions
    from pipeline.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    summary = build_propositions(TASKS_YAML, "dev", tok_dir, tmp_path, only=["sst2", "mnli"])
    assert summary["sst2"] | {} == summary["sst2"]
    assert (summary["sst2"]["examples"], summary["sst2"]["propositions"], summary["sst2"]["positives"]) == (872, 1744, 872)
    assert (summary["mnli"]["examples"], summary["mnli"]["propositions"]) == (9815, 3 * 9815)
    assert json.loads((tmp_path / "dev.summary.json").read_text())["tasks"]["sst2"]["skipped"] == 0
    ds = PropositionDataset(tmp_path / "dev", max_len=1024)
    assert len(ds) == 1744 + 3 * 9815
    ids, label, task = ds[0]
    assert tok.decode(ids.tolist()).endswith("[sep] Here, the movie review is emotionally negative. [cls]")
    assert sum(ds[i][1] for i in range(1744)) == 872 and {ds[i][2] for i in range(1744)} == {0}
    # A shorter context cuts the input, never the proposition.
    short = PropositionDataset(tmp_path / "dev", max_len=32)
    tail = tok.encode(" [sep] Here, the movie review is emotionally negative. [cls]")
    cut, _, _ = short[0]
    assert len(ids) > 32 and len(cut) == 32 and cut[-len(tail):].tolist() == tail and cut[0] == ids[0]


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("length_window", [1, 4])
def test_teacher_loader_shards_and_resumes_mid_epoch(tok_dir, tmp_path, length_window):
    from pipeline.data.loaders import teacher_loader
    from pipeline.data.propositions import build_propositions
    from pipeline.data.tokenizer import load_tokenizer

    pad = load_tokenizer(tok_dir).special.pad
    build_propositions(TASKS_YAML, "dev", tok_dir, tmp_path, only=["rte"])  # 554 propositions

    def loader(rank, consumed=0):
        return teacher_loader(str(tmp_path / "dev"), 64, pad, 8, rank, 2, seed=3, consumed_samples=consumed,
                              length_window=length_window)

    # 554 / 16 per step: step 35 crosses into the second (reshuffled) epoch.
    full = _take(loader(0), 40)
    other = _take(loader(1), 40)
    first = loader(0)
    head = _take(first, 30)
    assert first.state_dict() == {"consumed_samples": 30 * 16}
    resumed = _take(loader(0, first.state_dict()["consumed_samples"]), 10)
    for a, b in zip(full, head + resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(full, other))  # DP ranks differ
    batch = full[0]
    assert (batch["tokens"][torch.arange(8), batch["lengths"] - 1] == load_tokenizer(tok_dir).special.cls).all()
    assert (batch["tokens"][torch.arange(batch["tokens"].shape[1])[None] >= batch["lengths"][:, None]] == pad).all()


def test_task_blend_draws_each_task_in_its_share_each_item_once_per_task_epoch():
    from pipeline.data.loaders import TaskBlend

    tasks = np.repeat([0, 1, 2], [50, 30, 20])  # items 0-49 task 0, 50-79 task 1, 80-99 task 2
    blend = TaskBlend(np.arange(100), tasks, np.arange(100), {0: 1.0, 1: 3.0, 2: 0.0}, seed=5, chunk=40)
    drawn = np.array([blend[i] for i in range(400)])
    chunks = tasks[drawn].reshape(10, 40)
    assert (chunks == 0).sum(axis=1).tolist() == [10] * 10 and (chunks == 1).sum(axis=1).tolist() == [30] * 10
    first = drawn[tasks[drawn] == 1]
    assert sorted(first[:30]) == list(range(50, 80)) and sorted(first[30:60]) == list(range(50, 80))
    assert first[:30].tolist() != first[30:60].tolist()  # each task epoch reshuffled
    again = TaskBlend(np.arange(100), tasks, np.arange(100), {0: 1.0, 1: 3.0}, seed=5, chunk=40)
    assert [again[i] for i in (399, 7)] == [drawn[399], drawn[7]]


def test_task_blend_of_whole_examples_keeps_each_examples_propositions_side_by_side():
    from pipeline.data.loaders import TaskBlend
    from pipeline.errors import DataError

    tasks = np.repeat([0, 1], [40, 60])  # task 0: 20 examples of 2 propositions; task 1: 10 of 6
    starts = np.r_[np.arange(0, 40, 2), np.arange(40, 100, 6)]
    blend = TaskBlend(np.arange(100), tasks, starts, {0: 1.0, 1: 1.0}, seed=2, chunk=24)
    assert blend.per_chunk == 24  # 6 examples of task 0 and 2 of task 1: 12 propositions each
    drawn = [blend[i] for i in range(240)]
    runs, i = [], 0
    while i < len(drawn):
        size = 2 if drawn[i] < 40 else 6
        assert drawn[i:i + size] == list(range(drawn[i], drawn[i] + size)), drawn[i:i + size]
        runs.append(drawn[i])
        i += size
    six = [r for r in runs if r >= 40]  # 20 draws of task 1: two epochs of its 10 examples
    assert sorted(six[:10]) == sorted(six[10:]) == list(range(40, 100, 6))
    two = [r for r in runs if r < 40]  # 60 draws of task 0: three epochs of its 20 examples
    assert all(sorted(two[k:k + 20]) == list(range(0, 40, 2)) for k in (0, 20, 40))
    with pytest.raises(DataError, match="task 0's examples have different numbers of propositions: \\[2, 3\\]"):
        TaskBlend(np.arange(5), np.zeros(5), np.array([0, 2]), {0: 1.0}, seed=0)


def test_teacher_loader_with_task_weights_resumes_and_names_bad_weights(tok_dir, tmp_path):
    from pipeline.data.loaders import teacher_loader, teacher_mix
    from pipeline.data.propositions import build_propositions
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.errors import ConfigError

    pad = load_tokenizer(tok_dir).special.pad
    build_propositions(TASKS_YAML, "dev", tok_dir, tmp_path, only=["rte", "mrpc"])

    def loader(weights, consumed=0):
        return teacher_loader(str(tmp_path / "dev"), 64, pad, 8, 0, 2, seed=3, consumed_samples=consumed,
                              length_window=4, task_weights=weights)

    full = _take(loader({"rte": 1, "mrpc": 0}), 12)
    resumed = _take(loader({"rte": 1, "mrpc": 0}, 7 * 16), 5)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(full[7:], resumed) for k in a)
    assert teacher_mix(str(tmp_path / "dev"), {"rte": 1, "mrpc": 0}) == (
        "teacher data: 1,370 propositions of 2 tasks; drawn rte 100.0%, mrpc 0.0% (data.teacher_task_weights)")
    assert teacher_mix(str(tmp_path / "dev"), None).endswith("drawn rte 40.4%, mrpc 59.6% (as the data holds them)")
    rte = json.loads((tmp_path / "dev.summary.json").read_text())["tasks"]["rte"]["id"]
    assert {int(t) for batch in full for t in batch["tasks"]} == {rte}  # mrpc (weight 0) is never drawn
    paired = _take(teacher_loader(str(tmp_path / "dev"), 64, pad, 8, 0, 1, seed=3, length_window=4, whole_examples=True), 6)
    for batch in paired:  # an example's two propositions side by side: one true, one false, same input
        assert batch["labels"].view(-1, 2).sum(dim=1).tolist() == [1] * 4
    for weights, message in (({"rte": 1}, "no weight for mrpc"), ({"rte": 1, "mrpc": 1, "sst2": 1}, "no task sst2"),
                             ({"rte": 0, "mrpc": 0}, "one of them > 0")):
        with pytest.raises(ConfigError, match=f"data.teacher_task_weights \\(the tasks of .*dev: rte, mrpc\\): .*{message}"):
            loader(weights)


def test_length_grouping_reorders_within_windows_into_micro_batches_of_similar_length(tok_dir, tmp_path):
    from pipeline.data.loaders import teacher_loader
    from pipeline.data.propositions import build_propositions
    from pipeline.data.tokenizer import load_tokenizer

    pad = load_tokenizer(tok_dir).special.pad
    build_propositions(TASKS_YAML, "dev", tok_dir, tmp_path, only=["rte"])

    def global_batches(window: int) -> list[list[tuple[int, ...]]]:
        """8 steps of 2 ranks x 8 propositions: each step's propositions (unpadded), both ranks together."""
        ranks = [_take(teacher_loader(str(tmp_path / "dev"), 64, pad, 8, r, 2, seed=3, length_window=window), 8)
                 for r in (0, 1)]
        return [[tuple(row[:n].tolist()) for b in (a, b) for row, n in zip(b["tokens"], b["lengths"])]
                for a, b in zip(*ranks)]

    plain, grouped = global_batches(1), global_batches(4)
    for start in (0, 4):  # two windows of 4 steps: the same propositions, regrouped by length
        assert sorted(sum(plain[start:start + 4], [])) == sorted(sum(grouped[start:start + 4], []))
        spans = sorted((min(map(len, b)), max(map(len, b))) for b in grouped[start:start + 4])
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:])), spans
    assert [len(b) for b in grouped] == [16] * 8 and grouped[:4] != plain[:4]


def test_language_loader_resumes_and_stops_at_the_end(tok_dir, corpora, tmp_path, parallel_1):
    from pipeline.data.lm_dataset import language_dataset
    from pipeline.data.loaders import language_loader
    from pipeline.data.tokenizer import load_tokenizer

    ds = language_dataset([corpora / "b"], None, 32, 96, load_tokenizer(tok_dir), 0, tmp_path)
    full = list(language_loader(ds, 4, 1, 2))
    assert len(full) == len(ds) // 8
    resumed = list(language_loader(ds, 4, 1, 2, consumed_samples=5 * 8))
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(full[5:], resumed))
    assert torch.equal(full[0]["tokens"], torch.stack([ds[i]["tokens"] for i in range(4, 8)]))


class _WorkerProbe(torch.utils.data.Dataset):
    """One item: whether the loader worker reading it already holds megatron-core's GPT dataset module, which
    nothing on the way to this item imports (this file and its imports do not)."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"preloaded": torch.tensor("megatron.core.datasets.gpt_dataset" in sys.modules)}


def _first(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return samples[0]


def probe_loader_worker(out: str) -> None:
    from pipeline.data.loaders import StreamLoader

    loader = StreamLoader(_WorkerProbe(), _first, micro_batch=1, total_samples=1, num_workers=1)
    Path(out).write_text(json.dumps([bool(batch["preloaded"]) for batch in loader]))


def test_loader_workers_start_with_the_streams_modules_imported(tmp_path):
    """Workers fork from a server that imported the streams' modules once per rank, instead of importing torch and
    megatron-core's datasets each (~8 s of CPU a worker). In a rank of its own: a process has one fork server."""
    run_ranks(probe_loader_worker, 1, str(tmp_path / "out.json"))
    assert json.loads((tmp_path / "out.json").read_text()) == [True]
