"""One probe step of the tiny model under a layout, through the DeepSpeed engine.

Run as a script, one rank or several under torchrun (gloo):
    python tests/probe_ranks.py [config overrides...]
Rank 0 prints JSON {"record": ProbeResult.to_record(), "sums": per-group raw sums,
"checkpointed" / "saved": which of the stage's pipeline layers run under activation
checkpointing / are written to DeepSpeed's per-layer checkpoint files}.
The global batch is the same under every layout; each data-parallel replica takes its
share of its micro-batches (tensor and pipeline ranks of a replica see the same ones).
"""

import json
import sys

import torch

from megascale.config import load_config
from megascale.model import Transformer
from megascale.train.dist import exit_process, init_distributed
from megascale.train.engine import batch_layout, build_engine
from megascale.train.loop import make_groups
from megascale.train.probe import CoherenceProbe

MODEL = ["model.vocab_size=128", "model.d_model=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
         "model.max_seq_len=16", "model.sharing=cycle:2", "data.seq_len=16",
         "train.micro_batch_size=2", "train.global_batch_size=4"]


def main(overrides: list[str]) -> None:
    ctx = init_distributed()
    cfg = load_config(None, MODEL + overrides)
    groups = make_groups(cfg, ctx)
    layout = batch_layout(cfg, groups.dims.dp)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    engine = build_engine(model, cfg, layout, ctx.device, groups)
    probe = CoherenceProbe(engine.module, model.plan, groups, cfg.parallel.sequence_parallel)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 17), generator=gen) for _ in range(layout.grad_accum * groups.dims.dp)]
    batches = batches[groups.dp_rank * layout.grad_accum:(groups.dp_rank + 1) * layout.grad_accum]  # this replica's share
    batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in batches]
    probe.arm()
    if groups.dims.pp > 1:
        engine.train_batch(data_iter=iter(batches))
    else:
        for x, y in batches:
            engine.backward(engine(x, y))
            engine.step()
    result = probe.finish()
    checkpointed = getattr(engine.module, "is_checkpointable_results", [])
    saved = [hasattr(f, "state_dict") for f in getattr(engine.module, "forward_funcs", [])]  # in DeepSpeed's layer files
    if ctx.is_main:
        sums = {g: {"sq_norms": c.sq_norms, "dots": c.dots, "sum_sq": c.sum_sq} for g, c in result.groups.items()}
        print(json.dumps({"record": result.to_record(), "sums": sums, "checkpointed": checkpointed, "saved": saved}))


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_process(0)
