"""Weights, gradients and optimizer state take memory in proportion to *unique* parameters."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, clean_env


def probe(sharing: str, zero_stage: int) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_probe.py"), sharing, str(zero_stage)],
                         capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_state_memory_follows_unique_parameters(zero_stage):
    untied, tied = probe("none", zero_stage), probe("all", zero_stage)
    assert tied["applied"] == untied["applied"]  # same compute
    per_param_untied = untied["state_bytes"] / untied["unique"]
    per_param_tied = tied["state_bytes"] / tied["unique"]
    # Same bytes per unique parameter (fp32 weights + Adam moments, ± DeepSpeed's flat copies) ...
    assert 12 <= per_param_untied <= 24
    assert per_param_tied == pytest.approx(per_param_untied, rel=0.02)
    # ... so the tied model (1 stored block for 8 layers) needs a fraction of the memory.
    assert tied["state_bytes"] / untied["state_bytes"] == pytest.approx(tied["unique"] / untied["unique"], rel=0.02)
