"""launch/report.py and the optional Weights & Biases sink."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from conftest import ROOT, clean_env, run_pretrain

REPORT = ROOT / "launch" / "report.py"


def test_report_page_shows_config_plots_unties_throughput_memory(tmp_path, data_dir):
    run_pretrain(tmp_path, data_dir, "train.max_steps=4", "untie.when=step:2", "untie.moments=scale", "train.eval_every=2", "train.eval_batches=2",
                 "train.batch_rampup=4:1", "metrics.profile_start=3", "metrics.profile_steps=1")
    proc = subprocess.run([sys.executable, str(REPORT), str(tmp_path)], capture_output=True, text=True, env=clean_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = (tmp_path / "report.md").read_text()
    for section in ("## Untie and fault events", "## Throughput", "## Per-rank state memory", "## Config (newest checkpoint)"):
        assert section in page
    assert "| 2 | [0, 1] | [0, 1, 2, 3] | step 2 >= 2; step 2 >= 2 |" in page
    assert "| scale: block 0 ×0.5/×0.25, block 1 ×0.5/×0.25, block 2 ×0.5/×0.25, block 3 ×0.5/×0.25 | " in page
    assert "![loss](loss.png)" in page and (tmp_path / "loss.png").stat().st_size > 0
    assert '"sharing": "cycle:2"' in page and "validation loss |" in page
    assert '- step 1: global_batch {"global_batch": 8, "grad_accum": 2}' in page  # 4 for the first step, then 8
    assert "## Profile" in page and "`rank0_steps3-3.json.gz`, `rank0_steps3-3_top.txt`" in page and "aten::mm" in page


def test_report_of_a_non_run_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPORT), str(tmp_path)], capture_output=True, text=True, env=clean_env(), cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ") and "metrics.jsonl" in proc.stderr


def test_wandb_is_optional(tmp_path, data_dir):
    proc = run_pretrain(tmp_path, data_dir, "train.max_steps=2", "metrics.wandb_project=megascale-test",
                        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    if importlib.util.find_spec("wandb") is None:
        assert "wandb is not installed" in proc.stderr  # configured but absent: a warning, never a failure
    else:
        assert list((tmp_path / "wandb").glob("offline-run-*")), proc.stderr[-2000:]
