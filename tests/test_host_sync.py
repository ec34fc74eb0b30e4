"""No host reads of tensor values in megascale's own code on training steps that do not log.

tests/sync_audit.py counts ``.item()`` / ``float(t)`` / ``bool(t)`` / ``.tolist()`` /
``.numpy()`` / ``.cpu()`` calls by caller during three ``train_step`` calls. What
DeepSpeed and torch's optimizer read is theirs (listed in BENCHMARKS.md); anything
from megascale or its kernels would stall a GPU once per step and fails here. A
logging step may add one read, the logged values', and no more.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, clean_env, losses, run_pretrain


def audit(data_dir, tmp_path, overrides) -> dict:
    """tests/sync_audit.py's counts for the tiny run with these overrides."""
    args = [*TINY, f"data.path={data_dir}", f"train.out_dir={tmp_path}", "train.progress=false", *overrides]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sync_audit.py"), *args], capture_output=True,
                          text=True, env=clean_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("SYNC_AUDIT "))
    return json.loads(line.removeprefix("SYNC_AUDIT "))


@pytest.mark.parametrize("overrides", [
    ["train.loss_chunk_tokens=48"],  # fp32 (ZeRO-0 at dp=1), the fused loss in 3 chunks
    ["train.precision=bf16", "train.zero_stage=1", "model.sharing=all"],
    ["train.fused_loss=false", "parallel.activation_checkpointing=true"],
], ids=["fp32-chunked-loss", "bf16-zero1-tied", "plain-loss-ckpt"])
def test_training_steps_read_nothing_back_from_megascale(data_dir, tmp_path, overrides):
    counts = audit(data_dir, tmp_path, overrides)
    ours = {site: n for site, n in counts["reads_per_step"].items() if site.split(": ", 1)[1].startswith(("megascale/", "kernels/"))}
    assert ours == {}, f"host reads per step from megascale: {ours}"
    # A logging step adds exactly one read: loss, gradient norm and stop flag come back together.
    (site, n), = counts["reads_on_log_step"].items()
    assert n == 1 and site.startswith("tolist: megascale/train/loop.py:") and site.endswith(" read_log_values"), site


def _deepspeed_reads(data_dir, tmp_path, overrides) -> dict[str, float]:
    return {site: n for site, n in audit(data_dir, tmp_path, overrides)["reads_per_step"].items() if "deepspeed/" in site}


def test_check_grad_overflow_false_drops_deepspeeds_overflow_read(data_dir, tmp_path):
    """bf16: DeepSpeed's per-step inf/NaN scan of the gradients ends in a host read; the knob removes it."""
    bf16 = ["train.precision=bf16", "train.zero_stage=1"]
    checked = _deepspeed_reads(data_dir, tmp_path / "on", [*bf16, "train.check_grad_overflow=true"])
    unchecked = _deepspeed_reads(data_dir, tmp_path / "off", [*bf16, "train.check_grad_overflow=false"])
    overflow = [site for site in checked if site.endswith(" has_overflow")]
    assert len(overflow) == 1, checked
    assert not any(site.endswith(" has_overflow") for site in unchecked), unchecked
    assert sum(unchecked.values()) < sum(checked.values())


def test_check_grad_overflow_false_trains_the_same(data_dir, tmp_path):
    """With finite gradients the scan only decides to step, so both runs take the same steps to the bit."""
    bf16 = ["train.precision=bf16", "train.zero_stage=1", "train.max_steps=4", "train.eval_every=0"]
    run_pretrain(tmp_path / "on", data_dir, *bf16, "train.check_grad_overflow=true")
    run_pretrain(tmp_path / "off", data_dir, *bf16, "train.check_grad_overflow=false")
    on, off = losses(tmp_path / "on"), losses(tmp_path / "off")
    assert len(on) >= 2 and on == off
