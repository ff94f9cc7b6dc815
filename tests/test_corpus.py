"""`freelm data corpus` on every input format, with wikitext-2 paragraphs from ../shared/data: the same records
give the bytes of the plain JSON-lines build, directories and globs are read in the documented order, and
malformed records are named (`file:line`, `file:row N`) or skipped and counted."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA

WIKITEXT = SHARED_DATA / "lm" / "wikitext-2-tokenized" / "valid.txt"
BOOK = SHARED_DATA / "lm" / "gutenberg_nltk" / "blake-poems.txt"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    from pipeline.data.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("tok")
    train_sentencepiece([WIKITEXT], out, vocab_size=1000)
    return out


@pytest.fixture(scope="module")
def records() -> list[str]:
    """wikitext-2's validation paragraphs (its 2,461 non-blank lines) as documents."""
    lines = WIKITEXT.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


@pytest.fixture(scope="module")
def reference(tok, records, tmp_path_factory) -> Path:
    """The plain JSON-lines build with two workers, every other build's yardstick."""
    from pipeline.data.corpus import build_corpus

    root = tmp_path_factory.mktemp("reference")
    write(root / "docs.jsonl", records)
    stats = build_corpus([str(root / "docs.jsonl")], tok, root / "ref", workers=2)
    assert (stats.documents, stats.skipped) == (2461, {})
    return root / "ref"


def write(path: Path, texts: list[str | None], text_field: str = "text") -> Path:
    """`texts` in the format `path`'s name asks for: JSON lines (plain, .gz, .zst in two frames), Parquet in
    row groups of 500, or a saved `datasets` directory in up to three shards (a name without a suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(texts))), text_field: texts}), path, row_group_size=500)
    elif not path.suffix:
        from datasets import Dataset

        Dataset.from_dict({"id": list(range(len(texts))), text_field: texts}).save_to_disk(str(path), num_shards=min(3, len(texts)))
    else:
        lines = [json.dumps({text_field: t}).encode() + b"\n" for t in texts]
        path.write_bytes(compress(path, lines))
    return path


def compress(path: Path, lines: list[bytes]) -> bytes:
    import zstandard

    if path.suffix == ".gz":
        return gzip.compress(b"".join(lines))
    if path.suffix == ".zst":
        half = len(lines) // 2
        return b"".join(zstandard.ZstdCompressor().compress(b"".join(part)) for part in (lines[:half], lines[half:]))
    return b"".join(lines)


def output(prefix: Path) -> tuple[bytes, bytes]:
    return prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes()


def documents(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_the_reference_holds_every_paragraph(tok, records, reference):
    from pipeline.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok)
    assert documents(reference) == [ids + [tokenizer.special.eos] for ids in tokenizer.encode_batch(records)]


@pytest.mark.parametrize("name, workers", [("docs.jsonl", 1), ("docs.json.gz", 1), ("docs.jsonl.zst", 2),
                                           ("docs.parquet", 1), ("saved", 2)])
def test_every_format_writes_the_bytes_of_plain_json_lines(tok, records, reference, tmp_path, name, workers):
    from pipeline.data.corpus import build_corpus

    stats = build_corpus([str(write(tmp_path / name, records))], tok, tmp_path / "out", workers=workers)
    assert (stats.documents, stats.skipped_records) == (2461, 0)
    assert output(tmp_path / "out") == output(reference)


def test_directories_and_globs_read_in_the_documented_order(tok, records, tmp_path):
    from pipeline.data.corpus import build_corpus
    from pipeline.data.readers import expand_inputs
    from pipeline.data.tokenizer import load_tokenizer

    tree, extra = tmp_path / "tree", tmp_path / "extra"
    poem = BOOK.read_text(encoding="utf-8")[:3000]
    write(tree / "b.jsonl", records[0:3])
    (tree / "a.txt").write_text(poem, encoding="utf-8")
    (tree / "README").write_text("not a corpus file\n")
    write(tree / ".hidden.jsonl", records[40:42])
    write(tree / "sub" / "c.parquet", records[3:5])
    write(tree / "sub" / "ds", records[5:7])
    (tree / "sub" / "notes.md").write_text("# ignored\n")
    write(tree / "z.json.zst", records[7:9])
    write(extra / "y.jsonl.gz", records[11:12])
    write(extra / "x.jsonl.gz", records[9:11])

    inputs = [str(extra / "*.jsonl.gz"), str(tree), str(tree / "b.jsonl")]  # b.jsonl again: read once, first place
    names = ["x.jsonl.gz", "y.jsonl.gz", "a.txt", "b.jsonl", "c.parquet", "ds", "z.json.zst"]
    assert [p.name for p in expand_inputs(inputs)] == names
    stats = build_corpus(inputs, tok, tmp_path / "out", workers=2)
    texts = records[9:12] + [poem] + records[0:9]
    tokenizer = load_tokenizer(tok)
    assert stats.documents == 13
    assert documents(tmp_path / "out") == [ids + [tokenizer.special.eos] for ids in tokenizer.encode_batch(texts)]


def truncated(path: Path, texts: list[str]) -> int:
    """Write `texts` to a `.gz` / `.zst` (one frame) JSON-lines file cut in the middle; return how many whole
    lines the part left still decodes to."""
    import zstandard

    plain = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts)
    whole = gzip.compress(plain) if path.suffix == ".gz" else zstandard.ZstdCompressor().compress(plain)
    cut = whole[: len(whole) // 2]
    path.write_bytes(cut)
    decoder = zlib.decompressobj(wbits=31) if path.suffix == ".gz" else zstandard.ZstdDecompressor().decompressobj()
    return decoder.decompress(cut).count(b"\n")


def test_skip_leaves_out_exactly_the_malformed_records(tok, records, tmp_path):
    from pipeline.data.corpus import build_corpus

    good = records[:1400]
    bad_lines = [b'{"text": "unterminated\n', b'{"body": "no text field"}\n', b'{"text": null}\n', b"[1, 2]\n",
                 b'{"text": "caf\xe9"}\n']
    lines = [json.dumps({"text": t}).encode() + b"\n" for t in good[:5]]
    jsonl = tmp_path / "mixed.jsonl"  # good, bad, good, ... then the rest good; blank lines are no records
    jsonl.write_bytes(b"".join(x for pair in zip(lines, bad_lines) for x in pair) + b"\n  \n")
    parquet = write(tmp_path / "nulls.parquet", [good[5], None, good[6], good[7], None])
    saved = write(tmp_path / "saved", [None, good[8]])
    gz_lines = truncated(tmp_path / "cut.jsonl.gz", good[9:409])
    zst_lines = truncated(tmp_path / "cut.jsonl.zst", good[409:])  # ~450 KB: several zstd blocks
    kept = good[:9] + good[9:9 + gz_lines] + good[409:409 + zst_lines]
    assert 0 < gz_lines < 400 and 0 < zst_lines < 991

    inputs = [jsonl, parquet, saved, tmp_path / "cut.jsonl.gz", tmp_path / "cut.jsonl.zst"]
    stats = build_corpus([str(p) for p in inputs], tok, tmp_path / "out", workers=2, on_error="skip")
    assert stats.skipped == {str(jsonl): 5, str(parquet): 2, str(saved): 1, str(inputs[3]): 1, str(inputs[4]): 1}
    assert stats.first_skipped[str(jsonl)] == f"{jsonl}:2: invalid JSON (Unterminated string starting at)"
    assert stats.first_skipped[str(parquet)] == f"{parquet}:row 1: 'text' is null"
    assert stats.first_skipped[str(saved)] == f"{saved}:row 0: 'text' is null"
    assert stats.first_skipped[str(inputs[3])].startswith(f"{inputs[3]}:{gz_lines + 1}: corrupt gz stream")
    assert stats.first_skipped[str(inputs[4])].startswith(f"{inputs[4]}:{zst_lines + 1}: corrupt zst stream")
    assert stats.documents == len(kept)
    build_corpus([str(write(tmp_path / "kept.jsonl", kept))], tok, tmp_path / "clean", workers=1)
    assert output(tmp_path / "out") == output(tmp_path / "clean")


def test_each_kind_of_bad_json_line_is_named(tmp_path):
    from pipeline.data.readers import Batch, batch_texts

    lines = [b'{"text": "fine"}', b"{", b'{"body": 1}', b'{"text": 3}', b'"text"', b'{"text": "\xff"}']
    texts, errors = batch_texts(Batch(0, "d.json.gz", "json", "text", lines, [1, 2, 4, 7, 8, 9], 0))
    hint = " (.json files are read as JSON lines, one object per line)"
    assert texts == ["fine"]
    assert errors == [f"d.json.gz:2: invalid JSON (Expecting property name enclosed in double quotes){hint}",
                      f"d.json.gz:4: no 'text' field{hint}",
                      f"d.json.gz:7: field 'text' is not a string (number){hint}",
                      f"d.json.gz:8: not a JSON object (string){hint}",
                      f"d.json.gz:9: not UTF-8 (invalid start byte at byte 10){hint}"]


def test_a_bad_record_fails_the_cli_naming_file_and_row_and_leaves_no_output(tok, records, tmp_path):
    parquet = write(tmp_path / "docs.parquet", records[:600] + [None] + records[600:700], text_field="body")
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "corpus", "--input", str(parquet),
                          "--tokenizer", str(tok), "--out", str(tmp_path / "x"), "--text-field", "body"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and f"{parquet}:row 600: 'body' is null" in out.stderr
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.idx").exists()


def test_the_cli_summary_counts_skipped_records_per_file(tok, records, tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join([json.dumps({"text": records[0]}), "not json", json.dumps({"text": records[1]})]))
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "corpus", "--input", str(jsonl),
                          "--tokenizer", str(tok), "--out", str(tmp_path / "x"), "--on-error", "skip",
                          "--workers", "1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    summary, per_file = out.stdout.splitlines()
    assert summary.startswith("2 documents, ") and ", 1 records skipped in " in summary
    assert per_file == f"  skipped 1 in {jsonl}; first: {jsonl}:2: invalid JSON (Expecting value)"


def test_inputs_of_the_wrong_shape_fail_before_tokenizing(tok, records, tmp_path):
    from datasets import Dataset, DatasetDict

    from pipeline.data.corpus import build_corpus
    from pipeline.errors import DataError

    split = Dataset.from_dict({"text": records[:2]})
    DatasetDict(train=split, validation=split).save_to_disk(str(tmp_path / "dict"))
    write(tmp_path / "other.parquet", records[:2], text_field="body")
    (tmp_path / "books.txt.gz").write_bytes(gzip.compress(b"plain text"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "LICENSE").write_text("no corpus here\n")
    expected = {
        "dict": f"{tmp_path / 'dict'}: a DatasetDict with splits train, validation; pass one split's directory, "
                f"{tmp_path / 'dict'}/<split> (e.g. {tmp_path / 'dict' / 'train'})",
        "other.parquet": f"{tmp_path / 'other.parquet'}: no column 'text'; its columns are id, body (--text-field)",
        "books.txt.gz": f"{tmp_path / 'books.txt.gz'}: only JSON lines are read compressed (.jsonl.gz, .json.gz, "
                        ".jsonl.zst, .json.zst)",
        "empty": f"{tmp_path / 'empty'}: a directory with no corpus files (.txt, .parquet, .jsonl, .jsonl.gz, "
                 ".jsonl.zst, .json, .json.gz, .json.zst)",
        "*.tsv": f"{tmp_path / '*.tsv'}: matches no input files",
    }
    for name, message in expected.items():
        with pytest.raises(DataError) as err:
            build_corpus([str(tmp_path / name)], tok, tmp_path / "out")
        assert str(err.value) == message
    assert not (tmp_path / "out.bin").exists()
