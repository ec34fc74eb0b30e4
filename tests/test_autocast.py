"""train.precision=bf16-autocast: fp32 weights, gradients and optimizer; the forward's matmuls in bf16.

A plain PyTorch AMP loop's precision, through DeepSpeed's torch_autocast. On one
rank it must step torch's AdamW on the parameters themselves (stage 0), not
DeepSpeed's bf16 ZeRO optimizer, which is what it is for; with dp and pp it
trains like the other precisions.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, clean_env, losses, run_pretrain

# Built in a fresh process: DeepSpeed keeps autocast settings in module globals.
PROBE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from megascale.config import load_config
from megascale.model import Transformer
from megascale.train.dist import init_distributed
from megascale.train.engine import batch_layout, build_engine
from megascale.train.loop import make_groups

cfg = load_config(sys.argv[1] + "/configs/tiny.yaml", sys.argv[2:])
ctx = init_distributed()
torch.manual_seed(0)
model = Transformer(cfg.model)
engine = build_engine(model, cfg, batch_layout(cfg, 1), ctx.device, make_groups(cfg, ctx))
seen = []
for m in engine.module.modules():
    if type(m) is torch.nn.Linear:  # the projections (LMHead, a Linear too, returns the fp32 loss)
        m.register_forward_hook(lambda mod, args, out: seen.append(str(out.dtype)))
x = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1))
loss = engine(x[:, :-1], x[:, 1:])
engine.backward(loss)
engine.step()
print(json.dumps({"outputs": sorted(set(seen)), "loss": str(loss.dtype),
                  "params": sorted({str(p.dtype) for p in engine.module.parameters()}),
                  "grads_after_step": sorted({str(p.grad.dtype) for p in engine.module.parameters() if p.grad is not None}),
                  "optimizer": type(engine.optimizer).__name__}))
"""


def _probe(*overrides: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), *overrides], capture_output=True, text=True,
                          env=clean_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_autocast_computes_in_bf16_over_fp32_weights_with_the_torch_optimizer():
    got = _probe("train.precision=bf16-autocast")
    assert got["outputs"] == ["torch.bfloat16"]  # every projection ran in bf16
    assert got["params"] == ["torch.float32"]
    assert got["optimizer"] == "AdamW"  # stage 0 on one rank: torch's AdamW on the weights, no DeepSpeed copy
    bf16 = _probe("train.precision=bf16")
    assert bf16["params"] == ["torch.bfloat16"] and bf16["optimizer"] == "DeepSpeedZeroOptimizer"
    assert _probe("train.precision=fp32")["outputs"] == ["torch.float32"]


@pytest.mark.parametrize("parallel", [["train.zero_stage=1"], ["parallel.pp=2"], ["parallel.tp=2"]],
                         ids=["dp2-zero1", "pp2", "tp2"])
def test_autocast_trains_across_ranks_like_fp32(tmp_path, data_dir, parallel):
    """Two ranks in bf16-autocast: losses within bf16 rounding of the same run in fp32, weights saved in fp32."""
    runs = {}
    for precision in ("fp32", "bf16-autocast"):
        out = tmp_path / precision
        run_pretrain(out, data_dir, f"train.precision={precision}", *parallel, nproc=2)
        runs[precision] = losses(out)
    assert runs["fp32"].keys() == runs["bf16-autocast"].keys()
    for step, loss in runs["fp32"].items():
        assert runs["bf16-autocast"][step] == pytest.approx(loss, rel=2e-2), step
    assert runs["bf16-autocast"] != runs["fp32"]  # it did compute in bf16
    dtypes = set()
    for path in (tmp_path / "bf16-autocast" / "checkpoints").glob("step_*/**/*model_states.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        # The pipeline engine saves each layer's state dict as is (and "module": None beside them).
        weights = state["module"] if "module" in state else state
        dtypes |= {v.dtype for v in (weights or {}).values() if torch.is_tensor(v) and v.is_floating_point()}
    assert dtypes == {torch.float32}
