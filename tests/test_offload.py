"""ZeRO-Offload (``train.offload_optimizer=cpu``): the optimizer's state and its step on the host.

An offloaded run trains like the same run with the optimizer on the device (DeepSpeed's
CPU Adam against torch's AdamW: the same update, a different implementation), reports
its memory as ``formula_state_bytes`` says, and resumes exactly; so does ZeRO-3 with the
weight partitions offloaded as well (``train.offload_params=cpu``). Untying under offload
is one of test_untie.py's layouts.
"""

import pytest

from conftest import losses, state_memory, run_pretrain

LAYOUT = ["train.zero_stage=2", "train.precision=bf16", "train.max_steps=6", "train.save_every=3", "train.keep_checkpoints=3"]


VARIANTS = {
    "offload": ["train.offload_optimizer=cpu"],
    "device": [],
    # ZeRO-Infinity on the host: ZeRO-3 with the weight partitions offloaded as well.
    "infinity": ["train.zero_stage=3", "train.offload_optimizer=cpu", "train.offload_params=cpu"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Two ranks, bf16, six steps; ZeRO-2 with the optimizer offloaded and on the device, and ZeRO-3 offloading both."""
    out = {}
    for name, extra in VARIANTS.items():
        out[name] = tmp_path_factory.mktemp(name)
        out[name + "_log"] = run_pretrain(out[name], data_dir, *LAYOUT, *extra, nproc=2).stderr
    return out


def test_offloaded_optimizer_trains_like_the_device_one(runs):
    assert "optimizer offloaded to the host" in runs["offload_log"]
    offloaded, device = losses(runs["offload"]), losses(runs["device"])
    assert sorted(offloaded) == list(range(1, 7))
    for step, loss in device.items():
        assert offloaded[step] == pytest.approx(loss, rel=1e-3), step
    assert offloaded[6] < offloaded[1]


def test_offloaded_memory_matches_the_formula(runs):
    """Host-side master, moments, staging buffer and fp32 gradient partition, as the formula counts them."""
    for kind in VARIANTS:
        for r in state_memory(runs[kind]):
            for part in ("weights", "grads", "optimizer"):
                assert r["measured"][part] == pytest.approx(r["formula"][part], rel=0.03), (kind, r["rank"], part)
    (off, dev) = (state_memory(runs[k])[0] for k in ("offload", "device"))
    assert off["formula"]["optimizer"] > dev["formula"]["optimizer"]  # + the bf16 staging buffer
    assert off["formula"]["grads"] == 2 * dev["formula"]["grads"]  # fp32, not bf16, gradient partitions


def test_offloaded_weights_train_like_the_device_run(runs):
    """ZeRO-3 gathers the offloaded bf16 weight partitions for compute: the first loss is the device
    run's to the bit (same bf16 weights, same batch), the rest within the CPU Adam difference."""
    assert "optimizer and weights offloaded to the host" in runs["infinity_log"]
    infinity, device = losses(runs["infinity"]), losses(runs["device"])
    assert infinity[1] == device[1]
    for step, loss in device.items():
        assert infinity[step] == pytest.approx(loss, rel=1e-3), step


def test_offloaded_resume_is_exact(runs, data_dir, tmp_path):
    step3 = runs["offload"] / "checkpoints" / "step_00000003"
    run_pretrain(tmp_path, data_dir, *LAYOUT, "train.offload_optimizer=cpu", f"train.resume={step3}", nproc=2)
    full, resumed = losses(runs["offload"]), losses(tmp_path)
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]
