"""ZeRO-Offload (``train.offload_optimizer=cpu``): the optimizer's state and its step on the host.

An offloaded run trains like the same run with the optimizer on the device (DeepSpeed's
CPU Adam against torch's AdamW: the same update, a different implementation), reports
its memory as ``formula_state_bytes`` says, and resumes exactly. Untying under offload
is one of test_untie.py's layouts.
"""

import pytest

from conftest import losses, run_pretrain

LAYOUT = ["train.zero_stage=2", "train.precision=bf16", "train.max_steps=6", "train.save_every=3", "train.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Two ranks, ZeRO-2, bf16, six steps: optimizer offloaded, and on the device."""
    out = {}
    for name, extra in (("offload", ["train.offload_optimizer=cpu"]), ("device", [])):
        out[name] = tmp_path_factory.mktemp(name)
        out[name + "_log"] = run_pretrain(out[name], data_dir, *LAYOUT, *extra, nproc=2).stderr
    return out


def state_memory(out_dir):
    import json  # noqa: PLC0415

    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return next(r for r in map(json.loads, lines) if r.get("event") == "state_memory")["ranks"]


def test_offloaded_optimizer_trains_like_the_device_one(runs):
    assert "optimizer offloaded to the host" in runs["offload_log"]
    offloaded, device = losses(runs["offload"]), losses(runs["device"])
    assert sorted(offloaded) == list(range(1, 7))
    for step, loss in device.items():
        assert offloaded[step] == pytest.approx(loss, rel=1e-3), step
    assert offloaded[6] < offloaded[1]


def test_offloaded_memory_matches_the_formula(runs):
    """Host-side master, moments, staging buffer and fp32 gradient partition, as the formula counts them."""
    for kind in ("offload", "device"):
        for r in state_memory(runs[kind]):
            for part in ("weights", "grads", "optimizer"):
                assert r["measured"][part] == pytest.approx(r["formula"][part], rel=0.03), (kind, r["rank"], part)
    (off, dev) = (state_memory(runs[k])[0] for k in ("offload", "device"))
    assert off["formula"]["optimizer"] > dev["formula"]["optimizer"]  # + the bf16 staging buffer
    assert off["formula"]["grads"] == 2 * dev["formula"]["grads"]  # fp32, not bf16, gradient partitions


def test_offloaded_resume_is_exact(runs, data_dir, tmp_path):
    step3 = runs["offload"] / "checkpoints" / "step_00000003"
    run_pretrain(tmp_path, data_dir, *LAYOUT, "train.offload_optimizer=cpu", f"train.resume={step3}", nproc=2)
    full, resumed = losses(runs["offload"]), losses(tmp_path)
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]
