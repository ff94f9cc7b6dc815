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
