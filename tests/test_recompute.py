"""parallel.checkpoint_layers: the first N layers of each stage recompute in backward, the rest keep their activations.

What a layer keeps for backward is measured as the bytes autograd saves during the
forward (a saved-tensor hook around it): a recomputed layer saves nothing there, its
input being held by the checkpoint itself. The same measurement runs on the plain
model (one process, no DeepSpeed) and on DeepSpeed's PipelineModule as megascale
builds it (one stage, in a subprocess that starts a one-rank gloo group). Equal losses
across layouts with partial recomputation are in test_parallel.py.
"""

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, clean_env, metrics, run_pretrain
from megascale.config import ModelConfig, load_config
from megascale.errors import MegascaleError
from megascale.model.llama import Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=16, attention="torch")


def saved_bytes_and_grads(forward) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd saves while ``forward()`` computes a loss, and the loss's gradients by parameter name."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, model = forward()
    loss.backward()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def plain_model_run(checkpointing: bool, layers: int):
    def forward():
        model = Transformer(CFG, seed=0).train()
        model.activation_checkpointing, model.checkpoint_layers = checkpointing, layers
        tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        return model(tokens, tokens.roll(-1, 1)), model

    return saved_bytes_and_grads(forward)


def test_each_recomputed_layer_stops_keeping_its_activations_and_the_gradients_stay():
    stored, reference = plain_model_run(False, 0)
    kept = [plain_model_run(True, n)[0] for n in range(1, CFG.n_layers + 1)]
    every_layer, grads = plain_model_run(True, 0)
    # one layer's worth less per recomputed layer, down to what recomputing every layer keeps
    per_layer = stored - kept[0]
    assert per_layer > 0
    assert [stored - k for k in kept] == [per_layer * n for n in range(1, CFG.n_layers + 1)]
    assert kept[-1] == every_layer
    for name, g in reference.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)
    assert plain_model_run(True, 2)[0] < stored  # and nothing recomputes outside training
    model = Transformer(CFG, seed=0).eval()
    model.activation_checkpointing = True
    assert not any(model.recomputes(layer) for layer in range(CFG.n_layers))


PIPELINE_SCRIPT = r"""
import json, sys
import torch
from megascale.config import Config, ModelConfig, ParallelConfig
from megascale.model.llama import Transformer
from megascale.parallel.pipeline import StageUnit, build_pipeline_module
from megascale.train.dist import init_distributed
from megascale.train.loop import make_groups
sys.path.insert(0, sys.argv[1])
from test_recompute import CFG, saved_bytes_and_grads

ctx = init_distributed()
groups = make_groups(Config(model=CFG, parallel=ParallelConfig()), ctx)
tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
out = {}
for checkpointing, layers in [(False, 0), (True, 1), (True, 3), (True, 0)]:
    module = build_pipeline_module(Transformer(CFG, seed=0), groups, "uniform", checkpointing, checkpoint_layers=layers)
    module._precompute_checkpointable_values()  # what DeepSpeed's pipeline engine does when it wraps the module
    units = [f for f in module.forward_funcs if isinstance(f, StageUnit)]
    checked = list(zip(module.forward_funcs, module.is_checkpointable_results or []))
    chosen = [f.unit.layer if isinstance(f, StageUnit) else type(f).__name__ for f, on in checked if on]
    def forward():
        module.train()
        return module.loss_fn(module(tokens), tokens.roll(-1, 1)), module
    saved, _ = saved_bytes_and_grads(forward)
    out[f"{checkpointing}-{layers}"] = {"saved": saved, "recomputed": chosen, "units": [f.unit.layer for f in units]}
print(json.dumps(out))
"""


def test_pipeline_stage_recomputes_its_first_layers_only(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT, str(ROOT / "tests")], capture_output=True, text=True,
                          env=clean_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["False-0"]["units"] == [0, 1, 2, 3] and got["False-0"]["recomputed"] == []
    assert got["True-1"]["recomputed"] == [0] and got["True-3"]["recomputed"] == [0, 1, 2]
    assert got["True-0"]["recomputed"] == [0, 1, 2, 3]
    saved = [got[k]["saved"] for k in ("False-0", "True-1", "True-3", "True-0")]
    per_layer = saved[0] - saved[1]
    assert per_layer > 0 and saved[0] - saved[2] == 3 * per_layer
    assert saved[3] == saved[0] - 4 * per_layer  # every block; the embedding, norm and head keep theirs


@pytest.mark.parametrize("overrides, fragment", [
    (["parallel.checkpoint_layers=2"], "parallel.checkpoint_layers=2 needs parallel.activation_checkpointing=true"),
    (["parallel.activation_checkpointing=true", "parallel.checkpoint_layers=9"],
     "parallel.checkpoint_layers=9 exceeds model.n_layers=4"),
    (["parallel.activation_checkpointing=true", "parallel.checkpoint_layers=-1"], "parallel.checkpoint_layers=-1 must be >= 0"),
])
def test_bad_checkpoint_layers_is_one_line(overrides, fragment):
    with pytest.raises(MegascaleError, match=re.escape(fragment)):
        load_config(ROOT / "configs" / "tiny.yaml", overrides)


@pytest.mark.parametrize("nproc, overrides, recomputed", [
    (1, ["parallel.checkpoint_layers=3"], 3),
    (2, ["parallel.pp=2", "parallel.checkpoint_layers=1"], 2),  # the first layer of each of the two stages
], ids=["first3", "pp2-first1"])
def test_throughput_records_count_the_recomputed_forwards_as_hardware_flops(tmp_path, data_dir, nproc, overrides, recomputed):
    """MFU counts the model's FLOPs; with recomputation the records add hardware TFLOP/s and HFU, which count the
    recomputed forwards too (what Megatron's TFLOP/s reports), and the report shows both."""
    out = tmp_path / "run"
    run_pretrain(out, data_dir, "parallel.activation_checkpointing=true", "metrics.peak_tflops=1", *overrides, nproc=nproc)
    steps = [r for r in metrics(out) if r.get("tokens_per_s")]
    model = Transformer(ModelConfig(vocab_size=512, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=32))
    extra = model.recompute_flops_per_token(32, recomputed) / model.flops_per_token(32)
    assert steps and all(r["hardware_tflops_per_device"] == pytest.approx(r["tflops_per_device"] * (1 + extra)) for r in steps)
    assert all(r["hfu"] == pytest.approx(r["mfu"] * (1 + extra)) for r in steps)
    from megascale.train.report import write_report  # noqa: PLC0415

    assert "| HFU |" in write_report(out).read_text()


def test_no_recomputation_no_hardware_flops_field(tmp_path, data_dir):
    out = tmp_path / "run"
    run_pretrain(out, data_dir, "metrics.peak_tflops=1")
    steps = [r for r in metrics(out) if r.get("tokens_per_s")]
    assert steps and not any("hfu" in r for r in steps) and all(r["mfu"] is not None for r in steps)
