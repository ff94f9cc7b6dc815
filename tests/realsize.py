"""What a user of the paper's recipe has on disk, made here without a model hub: a GPT-2-medium-shaped
checkpoint (random weights, written by transformers' `save_pretrained`) and a GPT-2-style byte-level BPE
tokenizer (50,257 ids, trained with the `tokenizers` library on the Gutenberg books), plus both data streams
prepared from them by the CLI. Used by the real-size test and by benchmarks/memory.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LM_DATA = REPO.parent / "shared" / "data" / "lm"
BOOKS = LM_DATA / "gutenberg_nltk"
NOT_UTF8 = ("chesterton-ball.txt", "shakespeare-caesar.txt")
CORPUS_BOOKS = ("austen-persuasion.txt", "chesterton-brown.txt")
GPT2_VOCAB = 50257


def save_gpt2_tokenizer(out: Path, texts: Path = LM_DATA) -> Path:
    """A byte-level BPE with GPT-2's vocabulary size and `<|endoftext|>`, saved as a GPT2TokenizerFast. All of
    ../shared/data/lm that is UTF-8 (~14 MB) is just enough text for 50,257 ids."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    files = sorted(str(f) for f in texts.rglob("*.txt") if f.name not in NOT_UTF8)
    bpe.train(files, vocab_size=GPT2_VOCAB, special_tokens=["<|endoftext|>"], show_progress=False)
    if bpe.get_vocab_size() != GPT2_VOCAB:
        raise RuntimeError(f"{texts}: only {bpe.get_vocab_size()} BPE ids learned, GPT-2 has {GPT2_VOCAB}")
    tok = GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")
    tok.save_pretrained(str(out))
    return out


def save_gpt2_medium(out: Path, vocab_size: int = GPT2_VOCAB, seed: int = 0) -> Path:
    """GPT-2 medium's shape (24 layers, d 1024, 16 heads, 1024 positions) with random weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=vocab_size)
    GPT2LMHeadModel(config).save_pretrained(str(out))
    return out


def freelm(*args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"freelm {' '.join(args)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")


def prepare_gpt2_data(root: Path, books: Path = BOOKS, tasks: str = "sst2,rte", max_len: int = 256) -> Path:
    """`root`/hf-tok (the raw BPE), `root`/tok (imported: pad, [sep], [cls] added), `root`/lm (two books) and
    `root`/teacher/train (the tasks' train propositions), all through the CLI as a user would."""
    save_gpt2_tokenizer(root / "hf-tok")
    freelm("tokenizer", "import", "--hf", str(root / "hf-tok"), "--out", str(root / "tok"))
    freelm("data", "corpus", "--input", *[str(books / name) for name in CORPUS_BOOKS], "--tokenizer",
           str(root / "tok"), "--out", str(root / "lm"), "--workers", "1")
    freelm("data", "tasks", "--config", str(REPO / "recipes" / "tasks.yaml"), "--split", "train", "--only", tasks,
           "--tokenizer", str(root / "tok"), "--out", str(root / "teacher"), "--max-len", str(max_len))
    return root
