"""Checkpoint I/O shared by training, evaluation and export: DeepSpeed's sharded save with an atomic
`latest` (io), and reading the shards back as full or per-TP-rank weights (consolidate)."""
