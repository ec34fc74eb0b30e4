"""Measure the bytes that weights, gradients and optimizer state take under DeepSpeed.

Run as a script (a fresh process per sharing plan, one rank, gloo):
    python tests/memory_probe.py SHARING ZERO_STAGE
prints JSON {"unique": N, "applied": N, "state_bytes": B}: B is the growth of
live tensor memory from before the model exists to after one optimizer step.
"""

import json
import sys

import torch

from megascale.config import load_config
from megascale.model import Transformer
from megascale.train.dist import exit_process, init_distributed
from megascale.train.engine import batch_layout, build_engine
from megascale.train.loop import make_groups
from megascale.train.memory import live_tensor_bytes


def main(sharing: str, zero_stage: int) -> None:
    ctx = init_distributed()
    cfg = load_config(None, [f"model.sharing={sharing}", f"train.zero_stage={zero_stage}", "model.vocab_size=256",
                             "model.d_model=128", "model.n_layers=8", "model.n_heads=4", "model.max_seq_len=16",
                             "data.seq_len=16", "train.micro_batch_size=1"])
    groups = make_groups(cfg, ctx)
    tokens = torch.randint(0, 256, (1, 16))
    before = live_tensor_bytes()
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    counts = model.param_counts()
    engine = build_engine(model, cfg, batch_layout(cfg, ctx.world_size), ctx.device, groups)
    loss = engine(tokens, tokens)
    engine.backward(loss)
    engine.step()
    del loss
    after = live_tensor_bytes()
    print(json.dumps({"unique": counts.unique, "applied": counts.applied, "state_bytes": after - before}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    exit_process(0)
