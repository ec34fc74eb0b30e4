"""Tensor, pipeline and context parallelism by equivalence against the 1-rank run.

Each layout trains the tiny model (4 layers, GQA 4/2 heads) for 5 steps on the
same seed and global batch as the single process, fp32, for three sharing
plans; losses, gradient norms and the final (gathered) weights must agree.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import (BIN, ROOT, TINY, clean_env, events, free_port, last_checkpoint, losses, metrics, run_pretrain,
                      same_adam_state, same_checkpoint, spawn_ranks, state_memory)
from megascale.train.checkpoint import full_weights, read_meta

LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 2, 2), (2, 2, 1)]
SHARINGS = ["none", "all", "cycle:2"]


def records(out_dir, key):
    return {r["step"]: r[key] for r in metrics(out_dir) if key in r}


def final_weights(out_dir):
    path = last_checkpoint(out_dir)
    return full_weights(path, read_meta(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Memoised runs: (tp, pp, dp, sharing, extra overrides) → run directory."""
    cache = {}

    def get(tp, pp, dp, sharing, *extra):
        key = (tp, pp, dp, sharing, extra)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tp{tp}pp{pp}dp{dp}")
            # A short greedy sample at the end (stdout.txt), except where every new length recompiles the blocks.
            sample = [] if "train.compile=true" in extra else ["train.sample_tokens=12"]
            cp = next((int(e.split("=")[1]) for e in extra if e.startswith("parallel.cp=")), 1)
            proc = run_pretrain(out, data_dir, f"parallel.tp={tp}", f"parallel.pp={pp}", f"model.sharing={sharing}",
                                "train.eval_every=5", "train.eval_batches=2", *sample, *extra, nproc=tp * pp * cp * dp)
            (out / "stdout.txt").write_text(proc.stdout)
            (out / "stderr.txt").write_text(proc.stderr)  # the log
            cache[key] = out
        return cache[key]

    return get


# Every sharing plan on the 2-process layouts; the 4-process layouts (the slowest runs on
# a 2-core CI machine, 1-2 min each) with cycle:2, whose tie groups span both stages.
MATRIX = [(layout, sharing) for layout in LAYOUTS[:2] for sharing in SHARINGS] + [(layout, "cycle:2") for layout in LAYOUTS[2:]]


@pytest.mark.parametrize("layout, sharing", MATRIX, ids=lambda v: "tp{}pp{}dp{}".format(*v) if isinstance(v, tuple) else v)
def test_layout_matches_single_rank(runs, layout, sharing):
    assert_matches_single_rank(runs(1, 1, 1, sharing), runs(*layout, sharing))


def assert_matches_single_rank(single, parallel):
    """Losses, gradient norms and final weights of ``parallel`` are the 1-rank run ``single``'s."""
    expected, got = losses(single), losses(parallel)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    # The gradient norm counts each unique parameter once (no double count of tied replicas or TP copies).
    for step, norm in records(single, "grad_norm").items():
        assert records(parallel, "grad_norm")[step] == pytest.approx(norm, rel=1e-4), step
    reference, weights = final_weights(single), final_weights(parallel)
    assert set(weights) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_tensor_parallel_with_every_zero_stage(runs, stage):
    expected, got = losses(runs(1, 1, 1, "cycle:2")), losses(runs(2, 1, 1, "cycle:2", f"train.zero_stage={stage}"))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), (stage, step)
    # The full weights read back from every stage's files, ZeRO-3's partitions per tensor rank included
    # (what export, consolidation, layout conversion and fine-tuning start from).
    reference, weights = final_weights(runs(1, 1, 1, "cycle:2")), final_weights(runs(2, 1, 1, "cycle:2", f"train.zero_stage={stage}"))
    assert set(weights) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


def test_pipeline_at_zero_0_clips_by_the_whole_models_gradient_norm(runs):
    """fp32 ZeRO-0 over stages: DeepSpeed's own clip counted, past the first stage, only the tensor-sharded
    weights (1.07 for 1.20 on two stages) and clipped by that. Every kind of weight is on the second stage
    here: tensor shards, replicated norms, and the embedding tied to the LM head."""
    extra = ("model.tie_embeddings=true",)
    assert_matches_single_rank(runs(1, 1, 1, "cycle:2", *extra), runs(2, 2, 1, "cycle:2", "train.zero_stage=0", *extra))


def test_tied_replicas_stay_identical_across_stages(runs):
    """sharing=all on 2 stages: layers 1-2 (stage 0) and 3-4 (stage 1) hold replicas of one block."""
    ckpt = runs(1, 2, 1, "all") / "checkpoints" / "step_00000005"
    stage0 = torch.load(ckpt / "layer_01-model_00-model_states.pt")
    stage1 = torch.load(ckpt / "layer_04-model_00-model_states.pt")
    assert stage0.keys() == stage1.keys()
    for name in stage0:
        assert torch.equal(stage0[name], stage1[name]), name


def test_tied_embeddings_across_first_and_last_stage(runs):
    single = runs(1, 1, 1, "cycle:2", "model.tie_embeddings=true")
    piped = runs(1, 2, 1, "cycle:2", "model.tie_embeddings=true")
    expected, got = losses(single), losses(piped)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 1, 1)], ids=lambda l: "tp{}pp{}dp{}".format(*l))
def test_fused_loss_equals_plain_head_and_loss(runs, layout):
    """Every run above uses the fused chunked loss (the default); this pins it, split in chunks, to the plain path."""
    fused = runs(*layout, "cycle:2", "train.loss_chunk_tokens=48")  # 128 tokens per micro-batch: chunks of 48, 48, 32
    plain = runs(*layout, "cycle:2", "train.fused_loss=false")
    expected, got = losses(plain), losses(fused)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    reference, weights = final_weights(plain), final_weights(fused)
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


def test_compiled_blocks_train_the_same(runs):
    """train.compile=true (torch.compile of each block; inductor's CPU code here) on the 1-rank run."""
    plain, compiled = runs(1, 1, 1, "cycle:2"), runs(1, 1, 1, "cycle:2", "train.compile=true")
    expected, got = losses(plain), losses(compiled)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), step  # inductor may reorder float sums
    reference, weights = final_weights(plain), final_weights(compiled)
    assert set(weights) == set(reference)  # compiling in place keeps every parameter name
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_blocks_train_the_same_across_pipeline_stages(runs):
    """configs/1.3b.yaml compiles its blocks; on a cluster that config meets pp > 1, where DeepSpeed's pipeline
    engine runs the compiled blocks stage by stage (tie groups spanning both stages with cycle:2)."""
    eager, compiled = runs(1, 2, 1, "cycle:2"), runs(1, 2, 1, "cycle:2", "train.compile=true")
    expected, got = losses(eager), losses(compiled)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), step


def test_compiled_blocks_train_the_same_under_sequence_parallelism(runs):
    """Compiled blocks keep the projections' gathered input, eager ones gather it again in backward: same losses."""
    sp = ("cycle:2", "parallel.sequence_parallel=true")
    expected, got = losses(runs(2, 1, 1, *sp)), losses(runs(2, 1, 1, *sp, "train.compile=true"))
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


def test_activation_checkpointing_changes_nothing(runs):
    """Every layer recomputed, and (parallel.checkpoint_layers=1) the first layer of each stage alone: layers 0 and 2
    of the two stages (test_recompute.py measures what each keeps); and under sequence parallelism, whose
    projections keep their input's slice for backward, which recomputation drops and rebuilds."""
    expected = losses(runs(1, 1, 1, "cycle:2"))
    for layout, extra in [((1, 1, 1), ()), ((1, 2, 1), ()), ((2, 1, 1), ("parallel.sequence_parallel=true",)),
                          ((1, 2, 1), ("parallel.checkpoint_layers=1",))]:
        run = runs(*layout, "cycle:2", "parallel.activation_checkpointing=true", *extra)
        got = losses(run)
        for step, loss in expected.items():
            assert got[step] == pytest.approx(loss, rel=1e-5), (layout, extra, step)
    said = "the first 1 layer of each stage (the others keep their activations)"
    log = (run / "stderr.txt").read_text()
    assert f"activation checkpointing: {said} recomputed in backward" in log
    assert "memory per GPU by the planner's count: state (weights, gradients, Adam)" in log  # train/preflight.py


def test_a_background_save_of_pipeline_stages_writes_the_same_checkpoint(runs):
    """train.async_save with two stages: each stage's layer files and ZeRO partition, written by its thread,
    equal the waiting save's (the periodic save at the last step, published when the run ends)."""
    waited = runs(1, 2, 1, "cycle:2")
    background = runs(1, 2, 1, "cycle:2", "train.async_save=true", "train.save_every=5")
    assert losses(background) == losses(waited)
    (event,) = events(background, "checkpoint")
    assert event["saved_step"] == 5 and "write_s" in event
    tag = (waited / "checkpoints" / "latest").read_text()
    same_checkpoint(waited / "checkpoints" / tag, background / "checkpoints" / tag)


def test_checkpoint_converts_between_layouts(runs, data_dir, tmp_path):
    """Saved with tp=2 pp=2, resumed with tp=1 pp=1: same weights, same validation loss, same step."""
    source = runs(2, 2, 1, "cycle:2")
    ckpt = source / "checkpoints" / "step_00000005"
    proc = run_pretrain(tmp_path, data_dir, "model.sharing=cycle:2", f"train.resume={ckpt}",
                        "train.eval_every=5", "train.eval_batches=2")
    assert "converted from layout" in proc.stderr
    assert records(tmp_path, "val_loss")[5] == pytest.approx(records(source, "val_loss")[5], rel=1e-5)
    converted, original = final_weights(tmp_path), final_weights(source)
    for name, tensor in original.items():
        torch.testing.assert_close(converted[name], tensor, rtol=0, atol=0, msg=name)
    assert read_meta(tmp_path / "checkpoints" / "step_00000005")["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert "weights and Adam state restored" in proc.stderr
    same_adam_state(last_checkpoint(tmp_path), last_checkpoint(source))  # a pipeline's tensor-parallel ZeRO-1 partitions into torch's AdamW state


@pytest.mark.parametrize("target", [["parallel.tp=2"], ["train.zero_stage=3"], ["parallel.pp=2"]], ids=["tp2", "dp2-zero3", "pp2"])
def test_checkpoint_converts_into_a_sharded_layout(runs, data_dir, tmp_path, target):
    """Saved by one rank, resumed on two: each rank cuts its shard (tensor, stage or ZeRO-3 partition) from the full
    weights, and from the full Adam moments."""
    source = runs(1, 1, 1, "cycle:2")
    ckpt = source / "checkpoints" / "step_00000005"
    proc = run_pretrain(tmp_path, data_dir, "model.sharing=cycle:2", f"train.resume={ckpt}", *target,
                        "train.eval_every=5", "train.eval_batches=2", nproc=2)
    assert "converted from layout" in proc.stderr
    assert records(tmp_path, "val_loss")[5] == pytest.approx(records(source, "val_loss")[5], rel=1e-5)
    converted, original = final_weights(tmp_path), final_weights(source)
    for name, tensor in original.items():
        torch.testing.assert_close(converted[name], tensor, rtol=0, atol=0, msg=name)
    same_adam_state(last_checkpoint(tmp_path), last_checkpoint(source))


@pytest.mark.parametrize("source_layout", [(1, 1, 2), (1, 2, 1)], ids=["dp2", "pp2"])
def test_a_16_bit_checkpoint_converts_from_its_fp32_masters(runs, data_dir, tmp_path, source_layout):
    """bf16 under ZeRO: the module states (a pipeline's layer files) hold the weights rounded to bf16, so a new
    layout (here tp=2) starts from the fp32 master partitions (a pipeline's stage by stage), the weights the
    optimizer steps, with the Adam moments beside them."""
    source = runs(*source_layout, "cycle:2", "train.precision=bf16", "train.zero_stage=1")
    ckpt = source / "checkpoints" / "step_00000005"
    masters = full_weights(ckpt, read_meta(ckpt))
    assert any(not torch.equal(w, w.bfloat16().float()) for w in masters.values())  # more than bf16 holds
    proc = run_pretrain(tmp_path, data_dir, "model.sharing=cycle:2", "train.precision=bf16", "parallel.tp=2",
                        f"train.resume={ckpt}", nproc=2)  # at its last step: converted, then saved again
    assert "converted from layout" in proc.stderr
    converted = final_weights(tmp_path)
    for name, tensor in masters.items():
        torch.testing.assert_close(converted[name], tensor, rtol=0, atol=0, msg=name)
    same_adam_state(last_checkpoint(tmp_path), last_checkpoint(source))


def one_error_line(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("overrides, fragment", [
    (["parallel.tp=3"], "world size 2 is not divisible by parallel.tp × parallel.pp = 3×1"),
    (["parallel.pp=2", "model.n_layers=1", "model.sharing=none"], "parallel.pp=2 exceeds model.n_layers=1"),
])
def test_bad_layout_is_one_line(data_dir, tmp_path, overrides, fragment):
    """Through the documented launcher, one check that needs the world size and one against the model;
    the rest of the checks' messages are test_layout_checks_name_what_does_not_divide's, in process."""
    # The deepspeed launcher (the documented command) passes the exit status through; torchrun wraps it.
    proc = run_pretrain(tmp_path, data_dir, *overrides, nproc=2, launcher="deepspeed", check=False)
    assert fragment in one_error_line(proc)


@pytest.mark.parametrize("tp, pp, world, overrides, fragment", [
    (3, 1, 2, [], "world size 2 is not divisible by parallel.tp × parallel.pp = 3×1; launch a multiple of 3"),
    (2, 1, 2, ["model.d_model=96", "model.n_heads=6", "model.n_kv_heads=3"],
     "parallel.tp=2 neither divides model.n_kv_heads=3 nor is a multiple of it"),
    (2, 1, 2, ["model.vocab_size=511"], "parallel.tp=2 does not divide model.vocab_size=511"),
    (1, 2, 2, ["model.n_layers=1", "model.sharing=none"], "parallel.pp=2 exceeds model.n_layers=1"),
])
def test_layout_checks_name_what_does_not_divide(tp, pp, world, overrides, fragment):
    from megascale.config import load_config
    from megascale.errors import MegascaleError
    from megascale.parallel.topology import ParallelDims

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*TINY, *overrides])
    with pytest.raises(MegascaleError) as err:
        ParallelDims.from_world(tp, pp, world).check_model(cfg.model)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("layout", [(1, 1, 1)] + LAYOUTS, ids=lambda l: "tp{}pp{}dp{}".format(*l))
def test_state_memory_formula_matches_measurement(runs, layout):
    assert_state_memory_matches(runs(*layout, "cycle:2"), layout)


@pytest.mark.parametrize("layout", [(1, 1, 2), (1, 2, 1)], ids=["dp2", "pp2"])
def test_bf16_at_zero_0_runs_as_zero_1(runs, layout):
    """DeepSpeed's 16-bit optimizers without ZeRO train differently (an Adam step on zeros at start; a pipeline's
    BF16 optimizer clips by another gradient norm): bf16 at train.zero_stage=0 runs ZeRO-1, says so, and gives
    ZeRO-1's losses to the bit, with the state memory its formula counts."""
    zero0 = runs(*layout, "cycle:2", "train.precision=bf16", "train.zero_stage=0")
    assert losses(zero0) == losses(runs(*layout, "cycle:2", "train.precision=bf16", "train.zero_stage=1"))
    assert "ZeRO stage 1 (train.zero_stage=0 with bf16 weights would get DeepSpeed's 16-bit optimizers" in (
        zero0 / "stderr.txt").read_text()
    assert_state_memory_matches(zero0, layout)


def test_bf16_zero3_trains_in_bf16(runs):
    """ZeRO-3 partitions each parameter as it is drawn, so DeepSpeed never casts it: megascale casts it
    to the training dtype first. Same bf16 weights and batch, so ZeRO-1's first loss to the bit; weights
    at 2 bytes per parameter over dp (an fp32 partition measured twice the formula before the fix)."""
    zero3 = runs(1, 1, 2, "cycle:2", "train.precision=bf16", "train.zero_stage=3")
    zero1 = runs(1, 1, 2, "cycle:2", "train.precision=bf16", "train.zero_stage=1")
    assert losses(zero3)[1] == losses(zero1)[1]
    assert losses(zero3)[5] == pytest.approx(losses(zero1)[5], rel=1e-3)
    assert_state_memory_matches(zero3, (1, 1, 2))


def assert_state_memory_matches(out_dir, layout, cp=1):
    reports = state_memory(out_dir)
    assert len(reports) == layout[0] * layout[1] * layout[2] * cp
    for r in reports:
        for kind in ("weights", "grads", "optimizer"):
            measured = r["measured"][kind]
            if measured is None:  # the pipeline engine frees gradients inside train_batch
                continue
            # Flat ZeRO buffers are padded for alignment: allow 3%.
            assert measured == pytest.approx(r["formula"][kind], rel=0.03), (r["rank"], kind)


def test_evaluate_cli_scores_a_sharded_checkpoint_as_its_run_did(runs, tmp_path):
    """launch/evaluate.py on the tp=2 pp=2 checkpoint, one process, over the run's validation windows (eval_batches 2
    × micro-batch 4): the run's logged val_loss; bits per byte over the bytes those targets decode to."""
    from megascale.data import Tokenizer, TokenFile, batch_from_indices

    run, out = runs(2, 2, 1, "cycle:2"), tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), "--checkpoint", str(run), "--samples", "8",
                           "--batch-size", "3", "--json", str(out)], env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (got,) = json.loads(out.read_text())["scores"]
    assert got["loss"] == pytest.approx(records(run, "val_loss")[5], rel=1e-5)
    assert (got["split"], got["samples"], got["tokens"], got["seq_len"]) == ("val", 8, 8 * 32, 32)
    data = read_meta(run / "checkpoints" / "step_00000005")["data"]["path"]
    tokenizer = Tokenizer(f"{data}/tokenizer.model")
    _, targets = batch_from_indices(TokenFile(f"{data}/val"), range(8), 32)
    assert got["bytes"] == sum(len(tokenizer.decode(row).encode()) for row in targets.tolist())
    assert got["bits_per_byte"] == pytest.approx(got["loss"] * got["tokens"] / math.log(2) / got["bytes"])
    assert f"{got['loss']:.4f}" in proc.stdout

    split = tmp_path / "split.json"  # scored on 2 ranks again, split as training splits it (--tp 2): the same
    proc = spawn_ranks([sys.executable, str(ROOT / "launch" / "evaluate.py"), "--checkpoint", str(run), "--samples", "8",
                        "--tp", "2", "--json", str(split)], 2, clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(split.read_text())["scores"][0]["loss"] == pytest.approx(got["loss"], rel=1e-5)
    assert "×2 (tp 2, pp 1)" in proc.stdout

    shared = tmp_path / "shared.json"  # two data-parallel copies, batches of 3 windows round-robin: 0 and 2, then 1
    proc = spawn_ranks([sys.executable, str(ROOT / "launch" / "evaluate.py"), "--checkpoint", str(run), "--samples", "8",
                        "--batch-size", "3", "--json", str(shared)], 2, clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (dp,) = json.loads(shared.read_text())["scores"]
    assert (dp["samples"], dp["tokens"], dp["bytes"]) == (got["samples"], got["tokens"], got["bytes"])
    assert dp["loss"] == pytest.approx(got["loss"], rel=1e-6)
    assert "×2 (tp 1, pp 1, dp 2)" in proc.stdout and proc.stdout.count("bits/byte") == 1


def test_consolidate_cli_merges_any_layout(runs, tmp_path):
    """launch/consolidate.py: full fp32 weights from a tp=2 pp=2 checkpoint equal the 1-rank run's."""
    import subprocess
    import sys

    from conftest import ROOT, clean_env

    out = tmp_path / "weights.pt"
    subprocess.run([sys.executable, str(ROOT / "launch" / "consolidate.py"), "--checkpoint", str(runs(2, 2, 1, "cycle:2")),
                    "--out", str(out)], check=True, env=clean_env(), capture_output=True, text=True)
    state, reference = torch.load(out), final_weights(runs(1, 1, 1, "cycle:2"))
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", [(2, 1, 1), (2, 2, 1)], ids=lambda l: "tp{}pp{}dp{}".format(*l))
def test_sequence_parallelism_matches_single_rank(runs, layout):
    expected = losses(runs(1, 1, 1, "cycle:2"))
    got = losses(runs(*layout, "cycle:2", "parallel.sequence_parallel=true"))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    reference, weights = final_weights(runs(1, 1, 1, "cycle:2")), final_weights(runs(*layout, "cycle:2", "parallel.sequence_parallel=true"))
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout, kv_heads, extra", [((2, 1, 1), 1, ("parallel.sequence_parallel=true",)), ((4, 1, 1), 2, ()),
                                                     ((2, 2, 1), 1, ()), ((2, 1, 2), 1, ("train.zero_stage=3",))],
                         ids=["tp2-kv1-sp", "tp4-kv2", "tp2pp2-kv1", "tp2dp2-kv1-zero3"])
def test_more_tensor_ranks_than_kv_heads_matches_single_rank(runs, layout, kv_heads, extra):
    """tp a multiple of n_kv_heads: runs of tp/n_kv ranks hold one KV head, their gradients summed, counted once in
    the gradient norm (assert_matches_single_rank checks the norms) and once in the checkpoint's full weights
    (per-rank files, and the pipeline's per-layer files at pp=2, where the tie groups span both stages)."""
    kv = f"model.n_kv_heads={kv_heads}"
    single, parallel = runs(1, 1, 1, "cycle:2", kv), runs(*layout, "cycle:2", kv, *extra)
    assert_matches_single_rank(single, parallel)
    assert_state_memory_matches(parallel, layout)


def greedy_sample(out_dir) -> str:
    """The end-of-run greedy sample the launcher printed."""
    text = (out_dir / "stdout.txt").read_text()
    assert "sample (greedy):\n" in text, text[-2000:]
    return text.split("sample (greedy):\n", 1)[1]


@pytest.mark.parametrize("layout, extra", [((1, 2, 1), ()), ((2, 2, 1), ()), ((2, 1, 1), ("parallel.sequence_parallel=true",)),
                                           ((2, 2, 1), ("parallel.sequence_parallel=true",))],
                         ids=["pp2", "tp2pp2", "tp2-sp", "tp2pp2-sp"])
def test_end_of_run_sample_on_every_layout(runs, layout, extra):
    """Generation runs stage to stage under the pipeline (megascale.parallel.pipeline_infer) and on whole
    sequences under sequence parallelism: the same greedy tokens as the 1-rank run's, from the same weights."""
    assert greedy_sample(runs(*layout, "cycle:2", *extra)) == greedy_sample(runs(1, 1, 1, "cycle:2"))


def test_explicit_partition_puts_blocks_where_asked(runs):
    expected = losses(runs(1, 1, 1, "cycle:2"))
    out = runs(1, 2, 1, "cycle:2", "parallel.partition=1,3")
    for step, loss in losses(out).items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step
    stage0, stage1 = sorted(state_memory(out), key=lambda r: r["stage"])
    # Stage 0: embedding (512×64) + one block; stage 1: three applications of two tied blocks + norm + head.
    from megascale.config import ModelConfig
    from megascale.model.llama import Block

    block = sum(p.numel() for p in Block(ModelConfig(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2)).parameters())
    assert stage0["params"] == 512 * 64 + block
    assert stage1["params"] == 2 * block + 64 + 512 * 64


def test_each_rank_builds_only_the_weights_it_holds(tmp_path):
    """The model is built on the meta device: a tp=2 pp=2 rank gives storage to its shard of its stage only."""
    out = tmp_path / "startup.json"
    model = [a for a in TINY if a.startswith("model.")] + ["model.sharing=none", "data.seq_len=32"]
    cmd = [str(BIN / "torchrun"), "--nproc-per-node=4", f"--master-port={free_port()}", str(ROOT / "bench" / "startup.py"),
           *model, "parallel.tp=2", "parallel.pp=2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    d, layers = 64, 4
    replicated_norms = d * (2 * layers + 1)  # every tensor rank keeps the norms whole
    assert sum(r["params_bytes"] for r in result["ranks"]) == 4 * (result["params_unique"] + replicated_norms)
    for r in result["ranks"]:
        assert r["plain_model_bytes"] == r["params_bytes"], r  # nothing of the other stage, nothing unsharded


def test_two_nodes_by_hostfile_match_single_rank(runs, data_dir, tmp_path):
    """``deepspeed --hostfile`` over two nodes, simulated on this machine the way a cluster without ssh
    between its nodes runs it: one ``deepspeed --no_ssh --node_rank i`` per node, rendezvous at node 0.
    Data parallelism across the nodes reproduces the 1-rank run."""
    hosts = tmp_path / "hostfile"
    hosts.write_text("node-a slots=1\nnode-b slots=1\n")
    out, port = tmp_path / "run", str(free_port())
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), *TINY, f"data.path={data_dir}", f"train.out_dir={out}",
            "model.sharing=cycle:2", "train.eval_every=5", "train.eval_batches=2"]
    nodes = [subprocess.Popen([str(BIN / "deepspeed"), "--hostfile", str(hosts), "--no_ssh", f"--node_rank={i}",
                               "--master_addr=127.0.0.1", f"--master_port={port}", str(ROOT / "launch" / "pretrain.py"), *args],
                              env=clean_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "nnodes=2" in logs[1] and "world size 2" in logs[0]
    expected, got = losses(runs(1, 1, 1, "cycle:2")), losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


def test_vocab_parallel_loss_with_the_row_kernels(runs, data_dir, tmp_path):
    """tp=2 with model.fused_ops=triton (interpreter): each rank's chunk kernels see a vocabulary slice
    starting at its own offset, and the combined loss trains like the torch path's.

    The interpreter's cost grows with the tokens (a program a row), so this run is short: 3 steps of
    2 × 16-token micro-batches, with chunks of 12 tokens (the last one of each micro-batch shorter).
    """
    small = ("train.loss_chunk_tokens=12", "data.seq_len=16", "train.micro_batch_size=2",
             "train.global_batch_size=4", "train.max_steps=3")
    reference = runs(2, 1, 1, "cycle:2", *small)
    run_pretrain(tmp_path, data_dir, "parallel.tp=2", "model.sharing=cycle:2", *small, "model.fused_ops=triton",
                 nproc=2, env={"TRITON_INTERPRET": "1"})
    expected, got = losses(reference), losses(tmp_path)
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), step


# ------------------------------------------------------------------ context parallelism

# Each with the 1-rank run's seed and global batch; cp2dp2 also checks that the two
# context-parallel pairs read different samples (the sampler's rank is the batch rank).
CP_LAYOUTS = {
    "cp2": ((1, 1, 1), ()),
    "tp2cp2-sp": ((2, 1, 1), ("parallel.sequence_parallel=true",)),
    "pp2cp2": ((1, 2, 1), ()),
    "cp2dp2-zero3": ((1, 1, 2), ("train.zero_stage=3",)),
}


@pytest.mark.parametrize("name", CP_LAYOUTS)
def test_context_parallelism_matches_single_rank(runs, name):
    """Losses, gradient norms, validation loss, final weights and the end-of-run sample (run on whole
    sequences, megascale.parallel.context_parallel.context_parallel_off) of the 1-rank run."""
    layout, extra = CP_LAYOUTS[name]
    single, parallel = runs(1, 1, 1, "cycle:2"), runs(*layout, "cycle:2", "parallel.cp=2", *extra)
    assert_matches_single_rank(single, parallel)
    assert records(parallel, "val_loss")[5] == pytest.approx(records(single, "val_loss")[5], rel=1e-5)
    assert greedy_sample(parallel) == greedy_sample(single)
    # ZeRO partitions span the dp × cp ranks: the formula follows, as DeepSpeed's buffers show.
    assert_state_memory_matches(parallel, layout, cp=2)
    meta = read_meta(parallel / "checkpoints" / "step_00000005")
    assert meta["layout"] == {"tp": layout[0], "pp": layout[1], "cp": 2, "dp": layout[2]}


UNTIE = ("untie.when=step:3", "untie.probe_every=1", "untie.units=lowest:2")


def test_context_parallel_untie_and_probes_match_single_rank(runs):
    """sharing=all, probes every step, the two least aligned units untied at step 3, under ZeRO-2 partitions
    over the cp ranks: the same coherence, the same units untied, the same losses after."""
    single, parallel = runs(1, 1, 1, "all", *UNTIE), runs(1, 1, 1, "all", "parallel.cp=2", "train.zero_stage=2", *UNTIE)
    for step, loss in losses(single).items():
        assert losses(parallel)[step] == pytest.approx(loss, rel=1e-5), step
    probes = {r["step"]: r for r in events(single, "probe")}
    for r in events(parallel, "probe"):
        for key, value in probes[r["step"]].items():
            if key.startswith(("coherence/", "alignment/")):
                assert r[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (r["step"], key)
    (expected,), (got,) = events(single, "untie"), events(parallel, "untie")
    assert (got["step"], got["units"], got["plan_after"]) == (expected["step"], expected["units"], expected["plan_after"])
