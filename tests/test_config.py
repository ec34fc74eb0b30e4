"""Config: YAML + dotted overrides, strict types, one-line errors, docs for every field."""

import dataclasses
from pathlib import Path

import pytest

from megascale.config import Config, describe, field_docs, load_config
from megascale.errors import MegascaleError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(path)
    assert cfg.model.d_model % cfg.model.n_heads == 0


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.max_steps=50", "model.sharing=cycle:2", "optim.lr=1e-3", "train.progress=false"])
    assert cfg.train.max_steps == 50 and cfg.model.sharing == "cycle:2"
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.train.progress is False


def test_int_is_accepted_for_float_and_list_for_sharing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1\nmodel:\n  n_layers: 4\n  sharing: [0, 1, 0, 1]\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1.0 and cfg.model.sharing == "0,1,0,1"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.dmodel=64", "did you mean 'model.d_model'"),
        ("trian.max_steps=3", "did you mean 'train'"),
        ("train.max_steps=abc", "'train.max_steps' expects int"),
        ("train.max_steps=true", "'train.max_steps' expects int"),
        ("model.n_heads=3", "does not divide model.d_model"),
        ("model.n_kv_heads=3", "does not divide model.n_heads"),
        ("model.sharing=cycle:x", "is not an integer"),
        ("model.sharing=sequence:3", "does not divide model.n_layers"),
        ("model.sharing=0,1", "lists 2 group ids"),
        ("train.zero_stage=4", "must be 0, 1, 2 or 3"),
        ("data.seq_len=100000", "must be in 1..model.max_seq_len"),
        ("train.precision=fp8", "is not one of fp32, bf16, fp16"),
        ("max_steps", "is not of the form key.sub=value"),
        ("parallel.pp=2 train.zero_stage=3", "cannot be combined with pipeline parallelism"),
        ("parallel.sequence_parallel=true parallel.tp=3", "divisible by parallel.tp=3"),
        ("parallel.cp=3", "divisible by 2·cp = 6"),
        ("parallel.cp=0", "must be >= 1"),
        ("parallel.cp=2 parallel.tp=3 parallel.sequence_parallel=true data.seq_len=100", "parallel.tp=3 × parallel.cp=2"),
        ("parallel.pp=2 parallel.partition=1,2", "summing to model.n_layers=4"),
        ("parallel.pp=2 parallel.partition=balanced", "is not parameters, uniform, blocks"),
        ("train.compile=true train.zero_stage=3", "cannot be combined with train.zero_stage=3"),
        ("train.loss_chunk_tokens=-1", "must be >= 0"),
        ("model.fused_ops=cuda", "is not one of auto, torch, triton"),
        ("train.offload_optimizer=nvme", "is not one of none, cpu"),
        ("train.offload_optimizer=cpu train.zero_stage=0", "needs ZeRO"),
        ("train.offload_params=cpu train.zero_stage=2", "needs train.zero_stage=3"),
        ("train.offload_params=gpu", "is not one of none, cpu"),
        ("train.init_device=gpu", "is not one of auto, cpu"),
        ("untie.moments=reset", "is not one of copy, scale, probe"),
        ("optim.schedule=step", "is not one of cosine, linear, constant, wsd"),
        ("optim.decay_shape=exp", "is not one of 1-sqrt, linear, cosine"),
        ("optim.decay_fraction=0", "must be in (0, 1]"),
        # Ranges that failed deep inside a run (a modulo by zero, numpy's seed) or trained on silently.
        ("train.log_every=0", "train.log_every=0 must be >= 1"),
        ("train.seed=-1", "train.seed=-1 must be >= 0"),
        ("model.rope_theta=0", "model.rope_theta=0.0 must be > 0"),
        ("model.norm_eps=-1e-5", "must be > 0"),
        ("optim.beta2=1", "optim.beta2=1.0 must be in [0, 1)"),
        ("optim.weight_decay=-0.1", "must be >= 0"),
        ("optim.eps=0", "optim.eps=0.0 must be > 0"),
        ("train.eval_batches=0", "set train.eval_every=0 to skip validation"),
        ("train.keep_checkpoints=-1", "0 keeps every checkpoint"),
        ("untie.coherence_threshold=0", "untie.coherence_threshold=0.0 must be > 0"),
        ("metrics.peak_tflops=-1", "must be >= 0"),
        ("metrics.profile_steps=0", "metrics.profile_steps=0 must be >= 1"),
        ("train.batch_rampup=8:0", "'8:0' is not BATCH:UNTIL_STEP with both positive and the steps increasing"),
        ("train.batch_rampup=8:30,16:20", "'16:20' is not BATCH:UNTIL_STEP"),
        ("train.batch_rampup=eight:3", "(e.g. '256:1000,512:3000')"),
        ("metrics.profile_start=-2", "metrics.profile_start=-2 must be >= 0 (0 = no profile)"),
    ],
)
def test_bad_input_is_one_line(override, fragment):
    with pytest.raises(MegascaleError) as err:
        load_config(ROOT / "configs/tiny.yaml", override.split(" "))
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_a_batch_ramp_reads_as_written_and_counts_its_tokens(tmp_path):
    """'4:2' is 242 to YAML 1.1 (base 60); the config reads it as the text it is, in a file and in an override."""
    from megascale.train.engine import batch_layout, planned_tokens

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_rampup: 4:2\n  global_batch_size: 12\n  micro_batch_size: 4\n  max_steps: 5\n"
                    "data:\n  seq_len: 32\n")
    assert load_config(path).train.batch_rampup == "4:2"
    cfg = load_config(path, ["train.batch_rampup=4:2,8:3", "train.seed=0x10"])
    assert cfg.train.batch_rampup == "4:2,8:3" and cfg.train.seed == 16  # other YAML integers as before
    assert [batch_layout(cfg, 1, completed_steps=s).global_batch for s in range(5)] == [4, 4, 8, 12, 12]
    assert batch_layout(cfg, 1).global_batch == 12  # no step: the final batch
    assert planned_tokens(cfg, 1) == (2 * 4 + 1 * 8 + 2 * 12) * 32
    assert planned_tokens(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=1)), 1) == 4 * 32
    with pytest.raises(MegascaleError, match=r"^train.batch_rampup's batch 4 \(until step 2\) is not a multiple of micro_batch_size\*dp = 4\*2; "):
        batch_layout(cfg, 2, completed_steps=0)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(MegascaleError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1,\n")
    with pytest.raises(MegascaleError, match="not valid YAML"):
        load_config(bad)


def test_every_field_has_a_docstring():
    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            if dataclasses.is_dataclass(f.type) or isinstance(f.default_factory, type):
                walk(f.default_factory)

    walk(Config)
    assert any(line.strip().startswith("model.sharing") for line in describe())


def test_zero_section_follows_the_layout_and_device():
    from megascale.train.engine import zero_config

    def zero(dp, device="cuda", *overrides):
        return zero_config(load_config(ROOT / "configs" / "tiny.yaml", list(overrides)), dp, device)

    assert zero(1) == {"stage": 0}  # fp32 ZeRO-1 on one rank partitions nothing: stage 0
    assert zero(1, "cuda", "train.precision=bf16") == {"stage": 1}  # bf16 needs its fp32 master copy
    assert zero(1, "cuda", "train.precision=bf16-autocast") == {"stage": 0}  # fp32 weights: as fp32
    assert zero(1, "cuda", "parallel.pp=2") == {"stage": 0}  # pipeline stages too
    assert zero(1, "cuda", "parallel.pp=2", "train.precision=bf16") == {"stage": 1}
    assert zero(2) == {"stage": 1, "overlap_comm": True}
    assert zero(2, "cuda", "train.overlap_comm=false") == {"stage": 1, "overlap_comm": False}
    assert zero(2, "cpu") == {"stage": 1}  # no streams to overlap on
    assert zero(2, "cuda", "train.zero_stage=3") == {"stage": 3}  # ZeRO-3 overlaps by default
    # Offload is a ZeRO feature: fp32 at dp=1 keeps its stage; host buffers are pinned where there is a device.
    assert zero(1, "cuda", "train.offload_optimizer=cpu") == {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert zero(2, "cpu", "train.offload_optimizer=cpu", "train.zero_stage=3") == {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert zero(2, "cuda", "train.offload_params=cpu", "train.zero_stage=3") == {
        "stage": 3, "offload_param": {"device": "cpu", "pin_memory": True}}


def test_autocast_precision_keeps_fp32_state_and_computes_in_bf16():
    from megascale.train.engine import batch_layout, deepspeed_config
    from megascale.train.memory import formula_state_bytes

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.precision=bf16-autocast"])
    ds = deepspeed_config(cfg, batch_layout(cfg, 1), "cpu")
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # the weights stay fp32
    plain = deepspeed_config(load_config(ROOT / "configs" / "tiny.yaml", ["train.precision=bf16"]), batch_layout(cfg, 1), "cpu")
    assert not plain["torch_autocast"]["enabled"] and plain["bf16"]["enabled"]
    for stage, dp in ((0, 1), (1, 2), (3, 4)):
        assert formula_state_bytes(1000, "bf16-autocast", stage, dp) == formula_state_bytes(1000, "fp32", stage, dp)
    with pytest.raises(MegascaleError, match="train.precision=.bf16-amp. is not one of fp32, bf16, fp16, bf16-autocast"):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.precision=bf16-amp"])


def test_wsd_holds_the_peak_then_decays_and_extends():
    """warmup-stable-decay: the peak until the last decay_fraction of the steps, then 1-sqrt to min_lr_ratio;
    resumed with a larger max_steps, a stable-phase checkpoint trains on at the peak and decays at the new end."""
    import math

    from megascale.config import OptimConfig
    from megascale.train.engine import lr_lambda

    o = OptimConfig(warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.1)
    f = lr_lambda(o, 100)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert [f(s) for s in range(10, 81)] == [1.0] * 71
    assert f(90) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5))) and f(100) == pytest.approx(0.1)
    assert all(f(s + 1) < f(s) for s in range(80, 100))
    longer = lr_lambda(o, 200)
    assert [longer(s) for s in range(81)] == [f(s) for s in range(81)] and longer(99) == 1.0
    linear = lr_lambda(OptimConfig(warmup_steps=0, schedule="wsd", decay_fraction=0.5, decay_shape="linear", min_lr_ratio=0), 10)
    assert [linear(s) for s in range(11)] == pytest.approx([1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0])
    cosine = lr_lambda(OptimConfig(warmup_steps=0, schedule="cosine", min_lr_ratio=0), 10)  # as before
    assert cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
