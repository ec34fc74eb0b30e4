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

from conftest import ROOT, TINY, clean_env


@pytest.mark.parametrize("overrides", [
    ["train.loss_chunk_tokens=48"],  # fp32 (ZeRO-0 at dp=1), the fused loss in 3 chunks
    ["train.precision=bf16", "train.zero_stage=1", "model.sharing=all"],
    ["train.fused_loss=false", "parallel.activation_checkpointing=true"],
], ids=["fp32-chunked-loss", "bf16-zero1-tied", "plain-loss-ckpt"])
def test_training_steps_read_nothing_back_from_megascale(data_dir, tmp_path, overrides):
    args = [*TINY, f"data.path={data_dir}", f"train.out_dir={tmp_path}", "train.progress=false", *overrides]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sync_audit.py"), *args], capture_output=True,
                          text=True, env=clean_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("SYNC_AUDIT "))
    audit = json.loads(line.removeprefix("SYNC_AUDIT "))
    ours = {site: n for site, n in audit["reads_per_step"].items() if site.split(": ", 1)[1].startswith(("megascale/", "kernels/"))}
    assert ours == {}, f"host reads per step from megascale: {ours}"
    # A logging step adds exactly one read: loss, gradient norm and stop flag come back together.
    (site, n), = audit["reads_on_log_step"].items()
    assert n == 1 and site.startswith("tolist: megascale/train/loop.py:") and site.endswith(" read_log_values"), site
