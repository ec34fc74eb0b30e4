"""Checkpoints: exact resume, atomic saves under a crash, and refusal of bad checkpoints."""

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, events, metrics, last_checkpoint, losses, run_pretrain, same_adam_state, same_checkpoint
from megascale.train.zero_files import OPTIMIZER_NAMES


def snapshot(directory: Path) -> dict[str, str]:
    """Content hash of every file below ``directory``."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def eight_steps(tmp_path_factory, data_dir):
    """An uninterrupted 2-rank run of 8 steps with checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_pretrain(out, data_dir, "train.max_steps=8", "train.save_every=4", nproc=2)
    return out


def test_resume_is_exact(eight_steps, data_dir, tmp_path):
    meta = json.loads((eight_steps / "checkpoints" / "step_00000004" / "megascale.json").read_text())
    assert meta["step"] == 4 and meta["sharing_plan"] == [0, 1, 0, 1] and meta["data"]["sampler"]["consumed"] == 32
    assert meta["params"]["unique"] < meta["params"]["applied"]
    run_pretrain(tmp_path, data_dir, "train.max_steps=8", "train.save_every=4",
                 f"train.resume={eight_steps / 'checkpoints' / 'step_00000004'}", nproc=2)
    full, resumed = losses(eight_steps), losses(tmp_path)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in range(5, 9)] == [full[s] for s in range(5, 9)]  # bit-identical in fp32


def test_a_resumed_run_steps_with_the_configs_optimizer_settings_and_batch_not_the_checkpoints(eight_steps, data_dir, tmp_path):
    """DeepSpeed's load brings back the saved param groups and peak LR; a run extended with a new LR, weight decay,
    beta2 and max_steps must step with those (ZeRO-1 over two ranks here), and say which it changed. A larger
    global batch goes on from the sample the checkpoint stopped at (the order is the sampler test's)."""
    from megascale.config import load_config
    from megascale.train.engine import lr_lambda

    changes = ["optim.lr=2e-3", "optim.weight_decay=0.5", "optim.beta2=0.9", "train.max_steps=10", "train.global_batch_size=16"]
    proc = run_pretrain(tmp_path, data_dir, "train.save_every=0", *changes,
                        f"train.resume={eight_steps / 'checkpoints' / 'step_00000004'}", nproc=2)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*TINY, *changes])
    lr_now, lr_then = 2e-3 * lr_lambda(cfg.optim, 10)(4), 1e-3 * lr_lambda(cfg.optim, 8)(4)
    assert ("optim.lr 0.001 -> 0.002, optim.weight_decay 0.1 -> 0.5, optim.beta2 0.95 -> 0.9, train.max_steps 8 -> 10; "
            f"the LR for step 5 is {lr_now:.4g} (the saved run's schedule: {lr_then:.4g})" in proc.stderr)
    assert "the global batch goes from 8 to 16 sequences per step; the data goes on in the same order from sample 32" in proc.stderr
    assert [(r["step"], r["tokens"]) for r in metrics(tmp_path) if "loss" in r][:2] == [(5, (32 + 16) * 32), (6, (32 + 32) * 32)]
    (start,) = events(tmp_path, "start")
    assert start["optimizer"] == [
        {"lr": pytest.approx(lr_now, rel=1e-12), "betas": [0.9, 0.9], "eps": 1e-8, "weight_decay": wd}
        for wd in (0.5, 0.0)]


def test_a_resume_keeps_the_schedules_saved_position_when_steps_were_skipped(tmp_path):
    """fp16 skips the optimizer and scheduler steps that overflowed, so a checkpoint's schedule can be behind its
    step count. The LR after a load is the config's schedule at the scheduler's saved position, not at the step count.
    (fp16 does not run on this CPU; the engine below loads as DeepSpeed's does: optimizer, scheduler, step count.)"""
    from megascale.config import OptimConfig
    from megascale.train.checkpoint import load_checkpoint
    from megascale.train.engine import lr_lambda

    class Engine:  # DeepSpeed's load_checkpoint, reduced to what it restores for a torch optimizer at ZeRO-0
        def __init__(self, lr, saved=None):
            self.optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=lr, betas=(0.9, 0.9))
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(OptimConfig(warmup_steps=2), 10))
            self.global_steps, self.saved = 0, saved

        def load_checkpoint(self, load_dir, tag, **_):
            optimizer, scheduler, self.global_steps = self.saved
            self.optimizer.load_state_dict(optimizer)
            self.lr_scheduler.load_state_dict(scheduler)
            return load_dir, {}

    before = Engine(1e-3)
    for _ in range(6):  # six steps, two of them skipped: the scheduler stepped four times
        before.optimizer.step()
    for _ in range(4):
        before.lr_scheduler.step()
    after = Engine(2e-3, (before.optimizer.state_dict(), before.lr_scheduler.state_dict(), 6))
    load_checkpoint(after, tmp_path / "step_00000006")
    assert after.global_steps == 6 and after.lr_scheduler.last_epoch == 4
    group = after.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(2e-3 * lr_lambda(OptimConfig(warmup_steps=2), 10)(4)) and group["betas"] == (0.9, 0.9)


def test_a_batch_ramp_steps_as_a_resume_with_the_larger_batch_does(data_dir, tmp_path):
    """train.batch_rampup=8:3 over two ranks at ZeRO-2 with Adam on the host: accumulation goes from 1 to 2 after step
    3, where DeepSpeed's run-long micro-step count (3) would put the boundary after one micro-batch and ZeRO-2's host
    path keeps its own count. Steps 4-5 must equal a fresh engine's resumed from the ramp's own step 3 at batch 16."""
    common = ["train.global_batch_size=16", "train.zero_stage=2", "train.offload_optimizer=cpu", "train.max_steps=5"]
    ramp = tmp_path / "ramp"
    proc = run_pretrain(ramp, data_dir, *common, "train.batch_rampup=8:3", "train.save_every=3", nproc=2)
    assert "batch ramp: 8 until step 3, then 16 (train.batch_rampup)" in proc.stderr
    assert [(r["step"], r["global_batch"], r["grad_accum"]) for r in events(ramp, "global_batch")] == [(3, 16, 2)]
    assert [(r["step"], r["tokens"]) for r in metrics(ramp) if "loss" in r] == [
        (1, 256), (2, 512), (3, 768), (4, 1280), (5, 1792)]  # 8, then 16 sequences of 32 tokens
    resumed = tmp_path / "resumed"
    proc = run_pretrain(resumed, data_dir, *common, f"train.resume={ramp / 'checkpoints' / 'step_00000003'}", nproc=2)
    assert "the global batch goes from 8 to 16 sequences per step" in proc.stderr
    assert losses(resumed) == {s: losses(ramp)[s] for s in (4, 5)}  # bit for bit in fp32


def test_crash_during_save_keeps_previous_checkpoint(data_dir, tmp_path, eight_steps):
    args = ("train.max_steps=8", "train.save_every=4")
    crashed = run_pretrain(tmp_path, data_dir, *args, env={"MEGASCALE_FAULT_DURING_SAVE": "8"}, check=False)
    assert crashed.returncode == 17
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert (ckpts / "step_00000008.tmp").is_dir()  # the half-written save, never published
    before = snapshot(ckpts / "step_00000004")
    run_pretrain(tmp_path, data_dir, *args, "train.resume=auto")
    assert snapshot(ckpts / "step_00000004") == before
    assert (ckpts / "latest").read_text() == "step_00000008"
    assert not (ckpts / "step_00000008.tmp").exists()
    # The resumed run ends where the uninterrupted 2-rank run did (same global batches).
    assert losses(tmp_path)[8] == pytest.approx(losses(eight_steps)[8], rel=1e-5)


def test_a_background_save_writes_the_same_checkpoints_and_publishes_them_later(eight_steps, data_dir, tmp_path):
    """train.async_save: the same losses, the same files as the waiting saves; each periodic checkpoint becomes
    latest at a logging step after its own (once every rank has written), the last one before the run ends."""
    run_pretrain(tmp_path, data_dir, "train.max_steps=8", "train.save_every=4", "train.async_save=true", nproc=2)
    assert losses(tmp_path) == losses(eight_steps)
    for tag in ("step_00000004", "step_00000008"):
        same_checkpoint(eight_steps / "checkpoints" / tag, tmp_path / "checkpoints" / tag)
    saved = events(tmp_path, "checkpoint")
    assert [(e["saved_step"], "write_s" in e) for e in saved] == [(4, True), (8, True)]
    assert saved[0]["step"] > 4 and saved[1]["step"] == 8  # the last one waited for, at the end
    assert [e["saved_step"] for e in events(eight_steps, "checkpoint")] == [4, 8]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000008"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_a_run_resumed_in_another_layout_steps_on_as_the_saved_one(eight_steps, data_dir, tmp_path):
    """Adam's moments and step carry across layouts: saved under dp=2 (ZeRO-1 partitions) at step 4, resumed under
    tp=2 (torch's AdamW state, ZeRO-0), saved at step 6 and resumed over two pipeline stages (ZeRO-1 per stage):
    every loss is the uninterrupted run's. With the moments reset, the losses from step 6 on differ by 5e-4 to 2e-3."""
    steps = ["train.max_steps=8", "train.save_every=2"]
    whole, tp2, pp2 = eight_steps, tmp_path / "tp2", tmp_path / "pp2"
    proc = run_pretrain(tp2, data_dir, *steps, "parallel.tp=2", f"train.resume={whole / 'checkpoints' / 'step_00000004'}",
                        nproc=2)
    assert "weights and Adam state restored" in proc.stderr
    run_pretrain(pp2, data_dir, *steps, "parallel.pp=2", f"train.resume={tp2 / 'checkpoints' / 'step_00000006'}", nproc=2)
    expected = losses(whole)
    for run, first in ((tp2, 5), (pp2, 7)):
        got = losses(run)
        assert sorted(got) == list(range(first, 9))
        for step, loss in got.items():
            assert loss == pytest.approx(expected[step], rel=1e-6, abs=0), (run.name, step)


def test_a_run_resumed_with_adam_moved_to_the_host_steps_on_as_the_saved_one(eight_steps, data_dir, tmp_path):
    """Same layout, another state format (torch's AdamW in ZeRO-1 partitions → DeepSpeed's CPU Adam at ZeRO-2):
    DeepSpeed's own load would fail on the optimizer's settings, so this resumes by name as a layout change does."""
    proc = run_pretrain(tmp_path, data_dir, "train.max_steps=8", "train.zero_stage=2", "train.offload_optimizer=cpu",
                        f"train.resume={eight_steps / 'checkpoints' / 'step_00000004'}", nproc=2)
    assert "converted from layout {'tp': 1, 'pp': 1, 'dp': 2}, ZeRO-1/2 fp32 (weights and Adam state restored)" in proc.stderr
    expected, got = losses(eight_steps), losses(tmp_path)
    assert sorted(got) == [5, 6, 7, 8]
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=0), step


def test_a_pipelines_zero_0_state_converts_by_the_names_saved_beside_it(data_dir, tmp_path):
    """At ZeRO-0 a pipeline stage's Adam state is torch's list by index and its file holds no module: megascale
    saves the names beside it, and one process takes the moments bit for bit (converted at the last step, saved
    again)."""
    source, target = tmp_path / "pp2", tmp_path / "one"
    run_pretrain(source, data_dir, "parallel.pp=2", "train.zero_stage=0", "train.max_steps=2", nproc=2)
    ckpt = source / "checkpoints" / "step_00000002"
    proc = run_pretrain(target, data_dir, "train.max_steps=2", f"train.resume={ckpt}")
    assert "ZeRO-0 fp32 (weights and Adam state restored)" in proc.stderr
    same_adam_state(last_checkpoint(target), ckpt)
    # Saved before megascale named the state: the new layout starts its moments from zero, says so, and trains on.
    old = tmp_path / "old" / ckpt.name
    shutil.copytree(ckpt, old)
    for file in old.glob("mp_rank_*_model_states.pt"):
        states = torch.load(file, weights_only=False)
        del states[OPTIMIZER_NAMES]
        torch.save(states, file)
    proc = run_pretrain(tmp_path / "fresh", data_dir, "train.max_steps=3", f"train.resume={old}")
    assert "optimizer moments start from zero: this pipeline's ZeRO-0 optimizer state is kept by parameter index" in proc.stderr
    assert "weights restored, optimizer moments reset" in proc.stderr
    assert sorted(losses(tmp_path / "fresh")) == [3]


def test_the_state_format_of_a_checkpoint_is_what_deepspeed_ran_when_it_was_saved():
    """Recorded in megascale.json; older checkpoints are judged by the rules of their time: 16-bit weights at
    ZeRO-0 then ran DeepSpeed's optimizers without ZeRO, so they convert into today's ZeRO-1 rather than load."""
    from megascale.train.loop import saved_state_format, state_format

    bf16 = {"config": {"train": {"zero_stage": 0, "precision": "bf16"}}, "layout": {"tp": 1, "pp": 1, "dp": 2}}
    assert saved_state_format(bf16) == "ZeRO-0 bf16"
    assert saved_state_format({**bf16, "state_format": "ZeRO-1/2 bf16"}) == "ZeRO-1/2 bf16"
    fp32 = {"config": {"train": {"zero_stage": 1, "precision": "fp32", "offload_optimizer": "none"}},
            "layout": {"tp": 2, "pp": 1, "dp": 1}}
    assert saved_state_format(fp32) == "ZeRO-0 fp32"  # nothing to partition at dp=1
    # Pipeline stages at dp=1 kept ZeRO-1 until they ran ZeRO-0 too: a checkpoint of theirs converts into it.
    piped = {**fp32, "layout": {"tp": 1, "pp": 2, "dp": 1}}
    assert saved_state_format(piped) == "ZeRO-1/2 fp32"
    assert state_format(piped["config"]["train"], piped["layout"]) == "ZeRO-0 fp32"


def test_a_resume_with_nothing_to_train_leaves_its_checkpoint_as_it_is(data_dir, tmp_path):
    """Resumed at or past train.max_steps: it says so and ends, the checkpoint read neither rewritten nor replaced."""
    run_pretrain(tmp_path, data_dir, "train.max_steps=2")
    ckpts = tmp_path / "checkpoints"
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in ckpts.rglob("*") if p.is_file()}
    proc = run_pretrain(tmp_path, data_dir, "train.max_steps=2", "train.resume=auto")
    assert "nothing to train: the checkpoint is at step 2, train.max_steps=2" in proc.stderr
    assert f"checkpoint    : {ckpts / 'step_00000002'}" in proc.stdout
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in ckpts.rglob("*") if p.is_file()} == files


def test_a_step_saved_again_replaces_the_old_one_without_a_gap(data_dir, tmp_path):
    """Restarted from step 2 of a run that had saved step 4, the new step 4 takes the old one's place: the old one
    is moved aside, never deleted first. A stop between the two renames loses nothing: a resume reads the old one
    where it is, and the next save puts it back."""
    from megascale.train.checkpoint import latest_checkpoint

    run_pretrain(tmp_path, data_dir, "train.max_steps=4", "train.save_every=2")
    ckpts = tmp_path / "checkpoints"
    first = (ckpts / "step_00000004" / "megascale.json").stat().st_ino
    run_pretrain(tmp_path, data_dir, "train.max_steps=4", "train.save_every=2", f"train.resume={ckpts / 'step_00000002'}")
    assert (ckpts / "step_00000004" / "megascale.json").stat().st_ino != first  # a new save, not the old files
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_00000002", "step_00000004"]
    # The stop between the renames: the old step aside, the new one not yet in place.
    (ckpts / "step_00000004").rename(ckpts / "step_00000004.replaced")
    (ckpts / "step_00000004.tmp").mkdir()
    assert latest_checkpoint(ckpts) == ckpts / "step_00000004.replaced"
    proc = run_pretrain(tmp_path, data_dir, "train.max_steps=6", "train.save_every=2", "train.resume=auto")
    assert "using the complete step_00000004.replaced" in proc.stderr
    assert "step_00000004.replaced at step 4" in proc.stderr
    # The save at step 6 put step 4 back under its name (and kept two, train.keep_checkpoints' default).
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_00000004", "step_00000006"]
    assert latest_checkpoint(ckpts) == ckpts / "step_00000006"


def test_checkpoint_from_another_shape_is_refused(eight_steps, data_dir, tmp_path):
    ckpts = eight_steps / "checkpoints"
    before = snapshot(ckpts)
    proc = run_pretrain(tmp_path, data_dir, "model.d_model=128", f"train.resume={ckpts}", check=False)
    line = one_error_line(proc)
    assert "another model shape" in line and "d_model" in line
    assert snapshot(ckpts) == before


def test_unreadable_metadata_is_refused(eight_steps, data_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(eight_steps / "checkpoints" / "step_00000004", broken)
    (broken / "megascale.json").write_text("{not json")
    before = snapshot(broken)
    line = one_error_line(run_pretrain(tmp_path / "run", data_dir, f"train.resume={broken}", check=False))
    assert "megascale.json" in line and "unreadable" in line
    assert snapshot(broken) == before


def test_foreign_directory_is_refused(data_dir, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.pt").write_bytes(b"x")
    line = one_error_line(run_pretrain(tmp_path / "run", data_dir, f"train.resume={foreign}", check=False))
    assert "not a megascale checkpoint" in line


def test_missing_data_is_one_line(tmp_path, data_dir):
    line = one_error_line(run_pretrain(tmp_path, data_dir, f"data.path={tmp_path / 'nowhere'}", check=False))
    assert "prepare_data.py" in line


@pytest.mark.parametrize("override, fragment", [
    ("model.dmodel=64", "unknown config key 'model.dmodel'"),
    ("train.max_steps=many", "expects int"),
    ("model.n_heads=5", "does not divide model.d_model"),
])
def test_bad_config_is_one_line(tmp_path, data_dir, override, fragment):
    assert fragment in one_error_line(run_pretrain(tmp_path, data_dir, override, check=False))


def test_lazy_weights_assemble_each_tensor_when_read(tmp_path):
    """Tensor-parallel shards from memory-mapped files: merged and cast to fp32 per read, shapes known without a read."""
    import torch  # noqa: PLC0415

    from megascale.model.init import LazyWeights, Source  # noqa: PLC0415
    from megascale.train.checkpoint import _load, merge_tp_shards  # noqa: PLC0415

    full = {"embed.weight": torch.randn(8, 4), "blocks.0.attn.o_proj.weight": torch.randn(4, 6), "norm.weight": torch.ones(4)}
    shards = [{"embed.weight": full["embed.weight"].chunk(2)[r].to(torch.bfloat16).clone(),
               "blocks.0.attn.o_proj.weight": full["blocks.0.attn.o_proj.weight"].chunk(2, dim=1)[r].clone(),
               "norm.weight": full["norm.weight"].clone()} for r in range(2)]
    for r, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"{r}.pt")
    weights = LazyWeights(merge_tp_shards([_load(tmp_path / f"{r}.pt") for r in range(2)]), {"lm_head.weight": "embed.weight"})
    assert weights.shape("embed.weight") == (8, 4) and weights.shape("blocks.0.attn.o_proj.weight") == (4, 6)
    assert weights["embed.weight"].dtype == torch.float32
    torch.testing.assert_close(weights["embed.weight"], full["embed.weight"].to(torch.bfloat16).float())
    torch.testing.assert_close(weights["blocks.0.attn.o_proj.weight"], full["blocks.0.attn.o_proj.weight"], rtol=0, atol=0)
    assert weights["embed.weight"] is not weights["embed.weight"]  # assembled per read, never kept
    assert sorted(weights) == ["blocks.0.attn.o_proj.weight", "embed.weight", "lm_head.weight", "norm.weight"]
    assert "lm_head.weight" in weights and "head.weight" not in weights

    def unread():
        raise AssertionError("read to answer a membership or shape question")

    untouched = LazyWeights({"w": Source(unread, (2, 3))})
    assert "w" in untouched and untouched.shape("w") == (2, 3) and list(untouched) == ["w"]
    grown = weights.replaced({"lm_head.weight": torch.zeros(9, 4)})  # the alias's target is replaced with it
    assert grown.shape("embed.weight") == (9, 4) and grown["embed.weight"].sum() == 0
    as_dict = weights.to_dict()
    assert as_dict["lm_head.weight"] is as_dict["embed.weight"] and len(as_dict) == 4


@pytest.mark.parametrize("count", [1, 2, 4])
def test_lazy_weights_read_a_new_shard_from_the_saved_shards_it_overlaps(count):
    """Resharding tp=2 → tp=count: each piece equals the cut of the whole and touches only the saved shards it
    overlaps (the other saved shard is on the meta device here: reading it would fail)."""
    import torch  # noqa: PLC0415

    from megascale.model.init import Shard, cut  # noqa: PLC0415
    from megascale.model.init import LazyWeights  # noqa: PLC0415
    from megascale.train.checkpoint import merge_tp_shards  # noqa: PLC0415

    full = {"blocks.0.attn.q_proj.weight": torch.randn(8, 6), "blocks.0.attn.o_proj.weight": torch.randn(6, 8),
            "norm.weight": torch.randn(8)}
    saved = [{"blocks.0.attn.q_proj.weight": full["blocks.0.attn.q_proj.weight"].chunk(2)[r].to(torch.bfloat16),
              "blocks.0.attn.o_proj.weight": full["blocks.0.attn.o_proj.weight"].chunk(2, dim=1)[r].clone(),
              "norm.weight": full["norm.weight"].clone()} for r in range(2)]
    whole = LazyWeights(merge_tp_shards(saved))
    for name, dim in (("blocks.0.attn.q_proj.weight", 0), ("blocks.0.attn.o_proj.weight", 1), ("norm.weight", 0)):
        for index in range(count):
            shard = Shard(dim, index, count)
            piece = whole.piece(name, shard)
            assert piece.dtype == torch.float32 and piece.is_contiguous()
            torch.testing.assert_close(piece, cut(whole[name], shard), rtol=0, atol=0)
            if count > 1 and name != "norm.weight":
                unread = [{k: v.to("meta") if r != index * 2 // count else v for k, v in s.items()} for r, s in enumerate(saved)]
                torch.testing.assert_close(LazyWeights(merge_tp_shards(unread)).piece(name, shard), piece, rtol=0, atol=0)
    assert torch.equal(whole.piece("norm.weight", None), full["norm.weight"])


def test_a_zero_3_piece_is_read_across_the_flat_groups_it_spans():
    """ZeRO-3 lays each rank's pieces of every parameter end to end over its flat groups: a piece may start in one
    group and end in the next, and is read from those elements only."""
    from megascale.train.zero_files import _span

    flats = [torch.arange(0, 5.0), torch.arange(5, 7.0), torch.arange(7, 12.0)]
    whole = torch.cat(flats)
    for start in range(12):
        for numel in range(0, 12 - start + 1):
            assert torch.equal(_span(flats, start, numel), whole[start:start + numel])


def test_a_host_copy_is_the_state_at_the_save_not_after():
    from collections import OrderedDict

    from megascale.train.async_save import host_copy

    weight = torch.arange(6.0)
    state = {"module": OrderedDict(w=weight, alias=weight), "groups": [{"lr": 1e-3, "params": [0]}], "step": 4}
    copied = host_copy(state)
    weight.add_(1)  # the next optimizer step
    state["groups"][0]["lr"] = 5e-4  # the LR schedule
    assert torch.equal(copied["module"]["w"], torch.arange(6.0)) and copied["groups"][0]["lr"] == 1e-3
    assert type(copied["module"]) is OrderedDict and copied["module"]["alias"] is copied["module"]["w"]  # once


def test_a_background_write_that_fails_stops_with_one_line_and_publishes_nothing(tmp_path):
    """A real failed write (its directory is gone, as a full disk or a lost mount would fail it): the error
    names the checkpoint and the latest complete one, and ``latest`` is not moved."""
    from megascale.errors import MegascaleError
    from megascale.train.async_save import BackgroundWrites, HostSnapshotEngine
    from megascale.train.checkpoint import PendingSave

    root = tmp_path / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "latest").write_text("step_00000002")
    engine = HostSnapshotEngine()
    engine.save({"w": torch.ones(3)}, str(root / "step_00000004.tmp" / "gone" / "model_states.pt"))
    pending = PendingSave(root, 4, {"step": 4}, True, 2, BackgroundWrites(engine, engine.take()))
    while not pending.writes.done():
        time.sleep(0.01)
    # the training loop's poll at a logging step, and the wait before another save or at the end
    for call in (lambda: pending.written_everywhere(torch.device("cpu")), pending.finish):
        with pytest.raises(MegascaleError) as caught:
            call()
        said = str(caught.value)
        assert said.startswith("writing checkpoint step_00000004 failed (") and "step_00000002 is the latest" in said
        assert "\n" not in said and (root / "latest").read_text() == "step_00000002"
        assert not (root / "step_00000004").exists()
