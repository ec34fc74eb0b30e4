"""The planner's parallel layout: tensor × pipeline × data parallelism chosen by memory and a step-time model.

The memory per GPU is checked against the real trainer (the parameters each rank of a
tp=2 × pp=2 run holds), the emitted config runs on four CPU ranks, and the choice is
checked where its answer is known: one node stays data-parallel, a large model across
many nodes is split, and a slower network never makes the plan split the model less.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from conftest import clean_env, events, launch_command, spawn_ranks
from megascale.errors import MegascaleError
from megascale.hardware import lookup_gpu
from megascale.model.head_loss import auto_chunk_tokens
from megascale.config import load_config
from megascale.planner.layout import (MIN_CONTEXT_TOKENS, Links, activation_bytes, best_layout, candidate_layouts,
                                      context_sizes, layer_bytes_per_token, recomputed_layers, stage_params, state_bytes,
                                      step_time)
from megascale.planner.mappings import PUBLISHED
from megascale.planner.plan import data_section, make_budget, make_plan, plan_for_shape, plan_to_dict, render_plan, write_config
from megascale.planner.shapes import Shape, count

H100 = lookup_gpu("H100")
SHAPES = [
    Shape(512, 64, 4, 4, 2, 192, 32, sharing="cycle:2"),
    Shape(32000, 2048, 6, 16, 8, 5632, 2048, tie_embeddings=True),
    Shape(1000, 256, 4, 4, 4, 704, 128, sharing="all"),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_one_gpu_of_the_layout_holds_the_data_parallel_counts(shape):
    """Without tensor or pipeline parallelism a GPU holds every unique parameter; with them a share of each block."""
    assert stage_params(shape, 1, 1) == count(shape).unique
    assert stage_params(shape, 2, 1) < count(shape).unique
    # activations: tensor parallelism with sequence parallelism splits them all (test_tp_collectives.py) while the
    # ranks split the KV heads; past that each rank keeps a KV head whole; the first of pp stages keeps pp
    # micro-batches of its layers
    one = activation_bytes(shape, 1, "bf16")
    assert activation_bytes(shape, 1, "bf16", tp=2) == pytest.approx(one / 2)
    past_kv = 2 * shape.n_kv_heads
    assert activation_bytes(shape, 1, "bf16", tp=past_kv) > one / past_kv
    first = activation_bytes(shape, 1, "bf16", pp=2, in_flight=2)
    assert first >= activation_bytes(shape, 1, "bf16", pp=2, in_flight=1)
    assert recomputed_layers(5, 2, 2) == 4 and recomputed_layers(5, 2, 3) == 5 and recomputed_layers(4, 1, 4) == 4
    # ZeRO-3 holds its partition and the weights it gathers for compute (at most DeepSpeed's live-parameter bound)
    assert state_bytes(4e9, "bf16", 3, 8) == 4e9 * 16 / 8 + 2 * 1e9
    assert state_bytes(1e8, "bf16", 3, 8) == 1e8 * 16 / 8 + 2 * 1e8


SAVED_SCRIPT = r"""
import json, sys
import torch
from megascale.config import ModelConfig
from megascale.model.llama import Transformer
from megascale.train.memory import saved_activation_bytes

def saved_bytes(d, heads, kv, ffn, seq, dtype, layers):
    cfg = ModelConfig(vocab_size=64, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn,
                      max_seq_len=seq, attention="torch")
    model = Transformer(cfg, seed=0).to(dtype).train()
    model.set_ops_backend("triton")  # the fused RMSNorm, RoPE and SwiGLU kernels, as on CUDA
    tokens = torch.randint(0, 64, (2, seq), generator=torch.Generator().manual_seed(0))
    return saved_activation_bytes(model, lambda: model(tokens, tokens.roll(-1, 1)))

out = []
for d, heads, kv, ffn, seq, dtype in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    per_layer = saved_bytes(d, heads, kv, ffn, seq, dtype, 2) - saved_bytes(d, heads, kv, ffn, seq, dtype, 1)
    out.append(per_layer / (2 * seq))
print(json.dumps(out))
"""


def test_the_activation_model_is_what_the_real_model_keeps():
    """Per layer and token, the bytes autograd keeps in a training forward of the real model with the fused kernels
    (run by Triton's interpreter here, as on CUDA), against layer_bytes_per_token: MHA, GQA, fp32."""
    cases = [(256, 4, 4, 704, 64, "bfloat16"), (256, 4, 1, 512, 64, "bfloat16"), (128, 2, 2, 384, 32, "float32")]
    proc = subprocess.run([sys.executable, "-c", SAVED_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                          env=clean_env(TRITON_INTERPRET="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    for (d, heads, kv, ffn, seq, dtype), got in zip(cases, measured):
        shape = Shape(64, d, 1, heads, kv, ffn, seq)
        assert got == pytest.approx(layer_bytes_per_token(shape, "fp32" if dtype == "float32" else "bf16")), (d, kv, dtype)


def test_context_parallelism_splits_the_tokens_and_keeps_the_gathered_keys():
    shape = Shape(32000, 4096, 8, 32, 8, 11008, 65536)
    per_layer_kv = 2 * 8 * 128 * 2 * 65536  # bf16 K and V of the whole sequence, every KV head (tp = 1)
    fixed = 4 * 32000 * 4096 + 12 * auto_chunk_tokens(32000) * 32000  # the head's fp32 gradient, a chunk of logits
    none, two = activation_bytes(shape, 1, "bf16"), activation_bytes(shape, 1, "bf16", cp=2)
    assert two == none / 2 + fixed / 2 + 8 * per_layer_kv / 2  # half the tokens, but every layer keeps all the K and V
    assert activation_bytes(shape, 1, "bf16", cp=4) < two
    # shards of at least MIN_CONTEXT_TOKENS when the planner picks; any valid size when asked for
    assert context_sizes(65536, 1, 64) == [1, 2, 4, 8, 16]
    assert max(context_sizes(2048, 1, 64)) == 1 and context_sizes(2048, 1, 64, only=2) == [2]
    assert context_sizes(65536, 8, 8, only=0) == [1, 2, 4, 8] and 65536 // 16 >= MIN_CONTEXT_TOKENS
    assert context_sizes(100, 1, 8, only=4) == []  # 100 is not a multiple of 2·4


def test_a_long_sequence_plan_shares_each_sequence_over_context_ranks(tmp_path):
    plan = make_plan(make_budget(gpu=H100, n_gpus=64, hours=30 * 24), PUBLISHED["epoch"], seq_len=131072)
    assert plan.recipe.cp > 1 and plan.step.context > 0
    cfg = load_config(write_config(plan, tmp_path / "long.yaml"))
    assert cfg.parallel.cp == plan.recipe.cp and cfg.data.seq_len % (2 * cfg.parallel.cp * cfg.parallel.tp) == 0
    assert "context-parallel traffic" in render_plan(plan) and f"context {plan.recipe.cp}" in render_plan(plan)


def test_one_node_stays_data_parallel():
    plan = make_plan(make_budget(gpu=H100, n_gpus=8, hours=168), PUBLISHED["epoch"])
    assert (plan.recipe.tp, plan.recipe.pp) == (1, 1)
    assert "step time" in render_plan(plan) and "split over" not in render_plan(plan)
    single = make_plan(make_budget(gpu=H100, n_gpus=1, hours=168), PUBLISHED["epoch"])
    assert (single.recipe.tp, single.recipe.pp) == (1, 1) and "step time" not in render_plan(single)
    assert "other layouts" not in render_plan(single)


def test_a_large_model_across_nodes_is_split_and_the_config_says_how(tmp_path):
    """~100B on 1024 H100s: data parallelism alone needs recomputation (or ZeRO-3 traffic it cannot hide); the plan
    splits the model and emits a config that loads, with the SLURM line for 128 nodes."""
    plan = make_plan(make_budget(gpu=H100, n_gpus=1024, hours=30 * 24), PUBLISHED["epoch"])
    r = plan.recipe
    assert r.tp * r.pp > 1
    assert plan.data_parallel_only is not None and plan.step.efficiency > plan.data_parallel_only.efficiency
    dp = 1024 // (r.tp * r.pp)
    assert r.global_batch % (r.micro_batch * dp) == 0
    assert plan.memory.state + plan.memory.activations <= 0.9 * 80 * 2**30
    cfg = load_config(write_config(plan, tmp_path / "big.yaml"))
    assert (cfg.parallel.tp, cfg.parallel.pp) == (r.tp, r.pp) and cfg.parallel.sequence_parallel == (r.tp > 1)
    assert "sbatch --nodes=128 --ntasks-per-node=8" in (tmp_path / "big.yaml").read_text()
    assert any("split over" in note for note in plan.notes)
    step = plan_to_dict(plan)["step_model"]
    assert step["efficiency"] == pytest.approx(plan.step.efficiency) and step["links"]["net_gbs"] == 50.0
    # the runners-up: the best of each other split, best first, none better than the choice by more than the band
    others = plan.alternatives
    splits = [(x.tp, x.pp, x.cp) for x in others]
    assert 0 < len(others) <= 5 and len(set(splits)) == len(splits) and (r.tp, r.pp, r.cp) not in splits
    assert [x.step.efficiency for x in others] == sorted((x.step.efficiency for x in others), reverse=True)
    assert others[0].step.efficiency <= plan.step.efficiency + 0.01
    assert "other layouts" in render_plan(plan) and len(plan_to_dict(plan)["other_layouts"]) == len(others)


def test_a_slower_network_never_splits_the_model_less():
    def split(net_gbs: float) -> int:
        recipe = make_plan(make_budget(gpu=lookup_gpu("A10G"), n_gpus=64, hours=30 * 24, net_gbs=net_gbs), PUBLISHED["epoch"]).recipe
        return recipe.tp * recipe.pp

    splits = [split(gbs) for gbs in (1000.0, 50.0, 1.5625)]
    assert splits == sorted(splits) and splits[-1] > 1


def test_the_step_model_charges_what_its_docstring_says():
    shape, counts = SHAPES[1], count(SHAPES[1])
    links = Links(8, 400.0, 40.0)

    def step(**kw):
        args = dict(tp=1, pp=1, zero_stage=1, micro=1, global_batch=64, per_stage=0) | kw
        return step_time(shape, counts, "bf16", H100, links, 16, 0.5, **args)

    base = step()
    assert base.compute == pytest.approx(counts.flops_per_token * 64 * 2048 / (16 * H100.peak_flops * 0.5))
    assert base.bubble == base.tensor == base.pipeline == 0.0
    piped = step(pp=2)  # dp 8 → m = 64 / 8 = 8 micro-batches: a bubble of 1/8 of the step's compute
    assert piped.bubble == pytest.approx(piped.compute / 8)
    # the pipeline engine reduces after its schedule: the reduce-scatter and all-gather both show (8 ranks: NVLink)
    assert piped.data == pytest.approx(2 * stage_params(shape, 1, 2) * 2 * 7 / 8 / 400e9)
    split = step(tp=2)  # per layer and micro-batch 8 transfers (4 with a recomputed forward) of half the hidden states
    hidden = 2048 * 2048 * 2
    assert split.tensor == pytest.approx((64 // 8) * 8 * 6 * 0.5 * hidden / 400e9)
    assert step(tp=2, per_stage=2).tensor == pytest.approx((64 // 8) * (8 * 6 + 4 * 2) * 0.5 * hidden / 400e9)
    # context parallelism: K and V of the whole sequence gathered in forward, their gradients scattered in backward
    kv = 2 * 8 * 128 * 2 * 2048
    assert step(cp=2).context == pytest.approx((64 // 8) * 2 * 6 * 0.5 * kv / 400e9)
    # a GPU handles as many tokens a step with cp=2 (twice the micro-batches, half of each sequence)
    assert step(cp=2).tensor == 0.0 and step(tp=2, cp=2).tensor == pytest.approx(split.tensor)
    # ZeRO-3's traffic hides behind a micro-batch's compute on fast links, and shows on slow ones
    fast = step_time(shape, counts, "bf16", H100, Links(16, 400.0, 400.0), 16, 0.5, 1, 1, 3, 1, 64, 0)
    slow = step_time(shape, counts, "bf16", H100, Links(8, 400.0, 0.5), 16, 0.5, 1, 1, 3, 1, 64, 0)
    assert fast.data == 0.0 and slow.data > 0.0 and slow.efficiency < fast.efficiency


def test_every_candidate_fits_and_the_choice_is_the_best_within_the_band():
    shape = Shape(32000, 5120, 40, 40, 8, 13824, 4096)
    layouts = list(candidate_layouts(shape, count(shape), "bf16", H100, Links.of(H100), 64, 512, 0.4))
    assert {(x.tp, x.pp) for x in layouts} >= {(1, 1), (8, 1), (1, 2)}
    for x in layouts:
        assert x.state + x.activations <= 0.9 * 80 * 2**30 and x.tp * x.pp * x.dp == 64
        assert x.state == state_bytes(stage_params(shape, x.tp, x.pp), "bf16", x.zero_stage, x.dp)
        if x.checkpoint_layers:  # the fewest recomputed layers: one fewer would not fit
            fewer = activation_bytes(shape, x.micro_batch, "bf16", x.checkpoint_layers - 1, tp=x.tp, pp=x.pp,
                                     in_flight=min(x.pp, x.global_batch // (x.dp * x.micro_batch)))
            assert x.state + fewer > 0.9 * 80 * 2**30
    best = best_layout(layouts)
    assert best.step.efficiency >= max(x.step.efficiency for x in layouts) - 0.01
    assert all(x.model_parallel >= best.model_parallel for x in layouts if x.step.efficiency >= best.step.efficiency)


def test_forced_sizes_are_kept_or_refused_in_one_line():
    budget = make_budget(gpu=H100, n_gpus=64, hours=30 * 24)
    plan = make_plan(budget, PUBLISHED["epoch"], tp=8, pp=2)
    assert (plan.recipe.tp, plan.recipe.pp) == (8, 2)
    with pytest.raises(MegascaleError, match="--tp 3 does not fit this plan: it must be a power of two"):
        make_plan(budget, PUBLISHED["epoch"], tp=3)
    with pytest.raises(MegascaleError, match=r"--pp 7 must divide the GPUs left after tensor and context parallelism \(64\)"):
        make_plan(budget, PUBLISHED["epoch"], pp=7)
    with pytest.raises(MegascaleError, match=r"--cp 3 does not fit this plan: it must be a power of two"):
        make_plan(budget, PUBLISHED["epoch"], cp=3)
    with pytest.raises(MegascaleError, match="need a GPU budget whose memory is known"):
        make_plan(make_budget(flops=1e21), PUBLISHED["epoch"], tp=2)
    with pytest.raises(MegascaleError, match="--net-gbs -1 must be a positive bandwidth"):
        make_budget(gpu=H100, n_gpus=8, hours=1, net_gbs=-1)
    tiny = make_budget(gpu=dataclasses.replace(H100, memory_gib=1), n_gpus=8, hours=168)
    with pytest.raises(MegascaleError, match="no layout with --tp 2 fits the model on 1 GiB GPUs"):
        make_plan(tiny, PUBLISHED["epoch"], tp=2)


@pytest.mark.parametrize("tp, pp, cp", [(2, 2, 1), (1, 2, 2)], ids=["tp2pp2", "pp2cp2"])
def test_an_emitted_split_layout_trains_and_its_ranks_hold_what_the_plan_counted(tmp_path, data_dir, tp, pp, cp):
    """Four CPU ranks: the emitted config runs, and the fullest rank holds stage_params parameters."""
    shape = SHAPES[0]
    budget = make_budget(gpu=lookup_gpu("A10G"), n_gpus=4, hours=0.01)
    mapping = PUBLISHED["epoch"]
    plan = plan_for_shape(budget, mapping, mapping.allocate(budget.flops), shape, flops_model="exact", precision="bf16",
                          data=data_section(str(data_dir), 512, 32), out_dir=str(tmp_path / "run"), global_batch=8,
                          tp=tp, pp=pp, cp=cp)
    assert (plan.recipe.tp, plan.recipe.pp, plan.recipe.cp) == (tp, pp, cp)
    config = write_config(plan, tmp_path / "plan.yaml")
    proc = spawn_ranks(launch_command(4, "spawn") + [
        "--config", str(config), "train.max_steps=2", "train.precision=fp32", "train.eval_every=0", "train.save_every=0",
        "train.progress=false", "metrics.tensorboard=false", "metrics.plot=false"], 4, clean_env(), 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"layout: tp={tp} pp={pp}{f' cp={cp}' if cp > 1 else ''} dp=1" in proc.stderr
    ranks = events(tmp_path / "run", "state_memory")[0]["ranks"]
    assert max(r["params"] for r in ranks) == stage_params(shape, tp, pp)
    assert sum(r["params"] for r in ranks) < 4 * count(shape).unique


def test_cli_prints_the_split_and_the_sbatch_line(capsys, tmp_path):
    from test_planner import run_cli  # noqa: PLC0415

    rc, out, _ = run_cli(capsys, "--gpus", "1024", "--gpu", "H100", "--days", "30", "--emit-config", str(tmp_path / "c.yaml"),
                         "--plot-layouts", str(tmp_path / "layouts.png"))
    assert rc == 0 and "step time" in out and "split over" in out
    assert (tmp_path / "layouts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, _, err = run_cli(capsys, "--flops", "1e21", "--plot-layouts", str(tmp_path / "none.png"))
    assert rc == 2 and "--plot-layouts needs a GPU budget" in err and not (tmp_path / "none.png").exists()
    assert "start the run:  sbatch --nodes=128 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm/pretrain.sbatch" in out
    rc, out, _ = run_cli(capsys, "--gpus", "64", "--gpu", "H100", "--days", "30", "--tp", "8", "--pp", "2", "--json")
    parallel = json.loads(out)["config"]["parallel"]
    assert rc == 0 and {k: parallel[k] for k in ("tp", "sequence_parallel", "pp", "partition")} == {
        "tp": 8, "sequence_parallel": True, "pp": 2, "partition": "blocks"}
    rc, _, err = run_cli(capsys, "--gpus", "64", "--gpu", "H100", "--days", "30", "--tp", "3")
    assert rc == 2 and "--tp 3 does not fit this plan" in err and len(err.strip().splitlines()) == 1
    assert math.isfinite(float(json.loads(run_cli(capsys, "--gpus", "16", "--gpu", "H100", "--days", "1", "--json")[1])
                               ["step_model"]["efficiency"]))
