"""DeepSpeed ZeRO (stages 3 and 1) composed with megatron-core TP: a TP=2 x DP=2 grid of 4 gloo processes trains
with the same per-step losses as one process (fp32, rtol 1e-5; the one process reduces its gradients in place,
the grid reduce-scatters them); under ZeRO-3 no rank holds whole parameters, each block is gathered as one
unit, and nothing saved for backward keeps a released parameter's gathered storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distributed import run_ranks

GLOBAL_BATCH, STEPS = 8, 4
DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"


def train_rank(tp: int, ds_path: str, out: str) -> None:
    from megatron.core import parallel_state as ps

    from pipeline.model.config import ModelConfig
    from pipeline.model.freelm import FreeLM
    from pipeline.parallel.distributed import destroy_parallel, init_parallel
    from pipeline.parallel.ds_config import deepspeed_config
    from pipeline.parallel.engine import build_engine, build_model

    init_parallel(tp)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    micro = GLOBAL_BATCH // dp
    ds_config = deepspeed_config(ds_path, micro_batch=micro, grad_accum=1, grad_clip=1.0)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=1000, max_seq_len=32)
    model = build_model(lambda: FreeLM(cfg), ds_config)
    full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    held = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, torch.optim.AdamW(model.parameters(), lr=3e-3), ds_config)
    block = model.blocks[0]
    hooked = [name for name, module in block.named_modules() if module._forward_pre_hooks]
    untouched = torch.nn.functional.linear is torch._C._nn.linear
    data = torch.Generator().manual_seed(5)
    params = list(model.parameters())
    views = []  # tensors saved for backward that are views of a parameter (they pin its gathered storage)

    def pack(saved: torch.Tensor) -> torch.Tensor:
        views.append(any(saved._base is p for p in params))
        return saved

    losses = []
    for _ in range(STEPS):
        seqs = torch.randint(0, 1000, (GLOBAL_BATCH, 17), generator=data)[dp_rank * micro:(dp_rank + 1) * micro]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
            out_ = engine(seqs[:, :-1], signal="language", targets=seqs[:, 1:])
        engine.backward(out_.loss)
        engine.step()
        loss = out_.loss.detach().clone()
        torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
        losses.append(loss.item() / dp)
    if torch.distributed.get_rank() == 0:
        found = {"losses": losses, "held": held, "full": full, "hooked": hooked, "untouched": untouched,
                 "views": sum(views), "saved": len(views), "reduce_scatter": engine.optimizer.reduce_scatter}
        json.dump(found, open(out, "w"))
    destroy_parallel()


@pytest.mark.parametrize("stage", [3, 1])
def test_zero_tp2_dp2_matches_one_process(stage, tmp_path):
    ds_path = str(DS_CONFIGS / f"zero{stage}.json")
    run_ranks(train_rank, 1, 1, ds_path, str(tmp_path / "tp1.json"))
    run_ranks(train_rank, 4, 2, ds_path, str(tmp_path / "grid.json"))
    one, grid = (json.loads((tmp_path / f).read_text()) for f in ("tp1.json", "grid.json"))
    assert one["losses"][-1] < one["losses"][0]
    torch.testing.assert_close(torch.tensor(grid["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    # One data-parallel rank reduces its gradient bucket in place; two reduce-scatter (same losses, above).
    assert not one["reduce_scatter"] and grid["reduce_scatter"]
    assert one["untouched"] and grid["untouched"]  # torch's F.linear was not replaced by DeepSpeed's
    # Backward keeps weights, never views of them that would hold a released weight's gathered storage.
    assert one["saved"] > 0 and grid["saved"] > 0 and one["views"] == grid["views"] == 0
    if stage == 3:
        assert grid["held"] == 0 and grid["full"] > 0  # ZeRO-3 partitioned everything outside forward/backward
        assert one["hooked"] == grid["hooked"] == [""]  # DeepSpeed's gather hooks: on the block, none inside it
    else:
        assert grid["held"] == grid["full"] > 0 and one["hooked"] == grid["hooked"] == []
