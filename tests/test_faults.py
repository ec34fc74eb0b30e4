"""Non-finite losses under each train.nan_policy, with a NaN injected into one global batch."""

from __future__ import annotations

import json

import pytest

from conftest import events, losses, metrics, run_pretrain

NAN_AT_4 = {"MEGASCALE_FAULT_NAN_AT_STEP": "4"}
RUN = ["train.max_steps=7", "train.save_every=2"]


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("rollback")
    run_pretrain(out, data_dir, *RUN, "train.nan_policy=rollback", env=NAN_AT_4)
    return out


def test_stop_is_one_line_and_keeps_the_checkpoints(tmp_path, data_dir):
    proc = run_pretrain(tmp_path, data_dir, *RUN, env=NAN_AT_4, check=False)
    assert proc.returncode == 2
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert "loss became nan at step 4" in line and "train.resume=auto" in line
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()


def test_rollback_reloads_the_checkpoint_and_skips_the_batch(rolled_back):
    (event,) = events(rolled_back, "nan_rollback")
    assert event["step"] == 4 and event["to_step"] == 2
    records = [r for r in metrics(rolled_back) if "loss" in r]
    first3, replayed3 = [r["loss"] for r in records if r["step"] == 3]
    assert replayed3 == first3  # steps after the checkpoint replay exactly
    assert sorted(losses(rolled_back)) == list(range(1, 8))
    meta = json.loads((rolled_back / "checkpoints" / "step_00000006" / "megascale.json").read_text())
    assert meta["nonfinite"] == {"bad_batches": [event["skipped_batch"]], "events": 1}


def test_skip_leaves_the_weights_where_they_were(tmp_path, data_dir, rolled_back):
    run_pretrain(tmp_path, data_dir, *RUN, "train.nan_policy=skip", env=NAN_AT_4)
    (event,) = events(tmp_path, "nan_skip")
    assert event["step"] == 4 and event["micro_batches"] == 2  # both micro-batches of the poisoned step
    got = losses(tmp_path)
    assert got[4] is None
    # Step 5 here and step 4 after the rollback both train the batch after the poisoned one on the weights after step 3.
    assert got[5] == losses(rolled_back)[4]


def test_too_many_events_stop(tmp_path, data_dir):
    proc = run_pretrain(tmp_path, data_dir, *RUN, "train.nan_policy=skip", "train.nan_max_events=0", env=NAN_AT_4, check=False)
    assert proc.returncode == 2 and "train.nan_max_events=0" in proc.stderr


def test_a_stale_build_lock_is_named(tmp_path, monkeypatch, caplog):
    """A run killed while DeepSpeed JIT-builds its CPU op leaves torch's lock file; the next start would wait forever."""
    import os  # noqa: PLC0415
    import time  # noqa: PLC0415

    from megascale.train.dist import stale_build_locks, warn_stale_build_locks  # noqa: PLC0415

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    old, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir(exist_ok=True)
        lock.touch()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert stale_build_locks() == [old]
    with caplog.at_level("WARNING"):
        warn_stale_build_locks()
    assert f"{old} is 60 min old" in caplog.text and "remove it if no other run is building" in caplog.text


def test_weights_made_non_finite_are_never_saved(tmp_path, data_dir):
    """fp32 applies a non-finite gradient; with the loss read only every 3 steps, the save at step 4 must refuse."""
    proc = run_pretrain(tmp_path, data_dir, *RUN, "train.log_every=3", env=NAN_AT_4, check=False)
    assert proc.returncode == 2
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert "gradient norm nan at step 4" in line and "no checkpoint is written" in line, line
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()
    assert not (tmp_path / "checkpoints" / "step_00000004").exists()
