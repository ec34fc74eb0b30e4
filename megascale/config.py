"""Run configuration: typed nested dataclasses, YAML files, dotted overrides.

A config is built in three steps, each of which may raise ``MegascaleError``
with one line naming the offending key and the fix:

1. ``load_config(path, overrides)`` reads YAML, applies ``a.b=value`` overrides;
2. ``from_dict`` turns the nested dict into dataclasses, rejecting unknown keys
   and values of the wrong type;
3. ``validate`` checks the relations between fields (heads divide d_model, …).

Every field carries a docstring (the string literal under it); ``describe()``
reads them back so ``launch/pretrain.py --help-config`` lists every key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from megascale.errors import MegascaleError


PRECISIONS = ("fp32", "bf16", "fp16", "bf16-autocast")
FP32_STATE = ("fp32", "bf16-autocast")  # precisions whose weights, gradients and optimizer state are fp32


@dataclass
class ModelConfig:
    """Shape of the Llama-style decoder and how its blocks are tied."""

    vocab_size: int = 4096
    """Vocabulary size; must be >= the tokenizer's (the data pipeline trains one of this size)."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks applied per token (applied, not unique, blocks)."""
    n_heads: int = 4
    """Query heads; must divide d_model."""
    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 means n_heads; must divide n_heads."""
    ffn_dim: int = 0
    """SwiGLU hidden width; 0 means 8/3 * d_model rounded up to a multiple of ffn_multiple_of."""
    ffn_multiple_of: int = 64
    """Rounding for the default ffn_dim (hardware-friendly sizes)."""
    max_seq_len: int = 256
    """Longest sequence the RoPE tables are built for; data.seq_len must not exceed it."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the LM head."""
    sharing: str = "none"
    """Block sharing plan: none | all | cycle:k | sequence:k | explicit group list "0,1,0,1"."""
    attention: str = "auto"
    """Attention backend: auto (cudnn on Hopper and newer GPUs, measured fastest there; the Triton kernel on other GPUs; else torch) | torch (SDPA, PyTorch's backend order) | triton | triton-tma (the Triton kernel with its forward through TMA descriptors; Hopper, Triton >= 3.4) | cudnn (SDPA, cuDNN's backend first; CUDA)."""
    fused_ops: str = "auto"
    """RMSNorm, RoPE, SwiGLU and the fused loss's row-wise steps: auto (the Triton kernels on CUDA, except in compiled blocks, where Inductor fuses the PyTorch ops itself; PyTorch elsewhere) | torch | triton (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1). auto because an H100 trained 350m 1.82x faster with the kernels, eager (BENCHMARKS.md)."""
    init_std: float = 0.02
    """Std of the normal initialisation; residual output projections are scaled by 1/sqrt(2*n_layers)."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        m = self.ffn_multiple_of
        return m * ((8 * self.d_model // 3 + m - 1) // m)


@dataclass
class DataConfig:
    """Where the tokens come from."""

    corpus: str = "stdlib"
    """'stdlib' builds the embedded corpus (Python's own sources) at `path` if missing; 'prepared' requires `path` to exist (see launch/prepare_data.py)."""
    path: str = "data/stdlib"
    """Directory with manifest.json, tokenizer.model and train/val token files."""
    blend: str = ""
    """A weighted mix of prepared directories instead of data.path, e.g. '0.7 data/web, 0.3 data/code': training and
    validation samples come from each in proportion to its weight (repeating or thinning it). They must share one
    tokenizer (launch/prepare_data.py --tokenizer); data.corpus and data.path are then not used."""
    eval_parts: bool = True
    """With data.blend: also score each part's own validation split at every evaluation (val_loss_parts in
    metrics.jsonl), at the blend's cost per part; false scores the blend alone."""
    seq_len: int = 256
    """Training sequence length in tokens."""
    stdlib_max_bytes: int = 8_000_000
    """Size cap of the embedded stdlib corpus, in bytes of source text."""
    shuffle: bool = True
    """Shuffle sample order each epoch (deterministically from train.seed)."""


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine, linear and wsd schedules)."""
    warmup_steps: int = 100
    """Linear warm-up steps from 0 to lr."""
    schedule: str = "cosine"
    """Decay after warm-up: cosine | linear | constant | wsd (warmup-stable-decay: lr held until the last
    decay_fraction of the steps, then decay_shape down to min_lr_ratio)."""
    decay_fraction: float = 0.2
    """wsd: the final fraction of train.max_steps that decays."""
    decay_shape: str = "1-sqrt"
    """wsd: the decay's shape, 1-sqrt | linear | cosine (1-sqrt did best in Hägele et al. 2024)."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""


class HostOffload:
    """What ``offload_optimizer`` and ``offload_params`` say, for the trainer's config and the planner's recipe."""

    offload_optimizer: str
    offload_params: str

    @property
    def optimizer_on_host(self) -> bool:
        """The fp32 master and Adam moments live, and are stepped, on the host (ZeRO-Offload)."""
        return self.offload_optimizer != "none"

    @property
    def weights_on_host(self) -> bool:
        """Each rank's ZeRO-3 weight partition lives on the host, gathered to the device for compute."""
        return self.offload_params != "none"


@dataclass
class TrainConfig(HostOffload):
    """The training run: batch, precision, ZeRO, logging and checkpoints."""

    seed: int = 0
    """Seed for weights and data order."""
    init_device: str = "auto"
    """Where the initial weights are drawn: auto (the training device: fast, but CPU and CUDA generators differ, so the values depend on the kind of device) | cpu (the host's generator on every kind of device, like Megatron's --use-cpu-initialization: a GPU run starts from the weights a CPU run does; slower for large models)."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all ranks; 0 means micro_batch_size * data-parallel size. Gradient accumulation = global / (micro * dp)."""
    batch_rampup: str = ""
    """A smaller global batch early in the run: 'B1:S1,B2:S2' trains with global batch B1 until step S1, B2 until S2, then global_batch_size (Llama 3 and DeepSeek-V3 grow theirs). Each B a multiple of micro_batch_size * dp; '' = no ramp."""
    precision: str = "fp32"
    """fp32 | bf16 | fp16 | bf16-autocast. bf16/fp16: weights and gradients in that dtype, an fp32 master copy in the optimizer (fp16 with dynamic loss scaling). bf16-autocast: weights, gradients and optimizer in fp32, matmuls and attention in bf16 under torch.autocast (DeepSpeed's torch_autocast), as a plain PyTorch AMP loop trains; on one rank it steps torch's fused AdamW directly instead of DeepSpeed's bf16 optimizer."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3. What runs is logged at start-up: fp32 stages 1-2 at dp=1 run as 0 (nothing to partition); bf16/fp16 at 0 run as 1 (DeepSpeed's 16-bit optimizers without ZeRO train differently; README, "ZeRO at one data-parallel rank")."""
    offload_optimizer: str = "none"
    """none | cpu: keep the fp32 master weights and Adam moments in host memory and step them there with DeepSpeed's CPU Adam (ZeRO-Offload), so the accelerator holds only the working weights and gradients. Needs train.zero_stage 1-3."""
    offload_params: str = "none"
    """none | cpu: with ZeRO-3, keep each rank's partition of the weights in host memory too (ZeRO-Infinity): the accelerator holds only the layers being computed, gathered on the fly. Slower; for a model whose weights do not fit. Needs train.zero_stage=3."""
    eval_every: int = 100
    """Validation every this many steps (and at the start and the end); 0 disables."""
    eval_batches: int = 16
    """Validation micro-batches per evaluation over all ranks (rounded down to a multiple of the data-parallel size)."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    save_every: int = 0
    """Checkpoint every this many steps; 0 means only at the end."""
    keep_checkpoints: int = 2
    """Complete checkpoints to keep; older ones are deleted after a newer one is safely written. 0 keeps every one."""
    async_save: bool = False
    """Write the periodic checkpoints in the background: training pauses only while each rank copies its state to host memory (one copy's worth of host RAM), a thread writes the files, and the checkpoint becomes `latest` at the first logging step after every rank has written. The final save, and one before a rollback, wait."""
    out_dir: str = "runs/tiny"
    """Run directory: checkpoints/, metrics.jsonl, loss.png, tensorboard/."""
    init_hf: str = ""
    """Start (a fresh run) from a Hugging Face Llama directory: its shape replaces model.* (untied) and its weights are loaded. Prepare the data with its tokenizer."""
    resume: str = ""
    """'' starts fresh; 'auto' resumes from the latest checkpoint in out_dir if there is one; or a checkpoint path."""
    sample_prompt: str = "def "
    """Prompt for the greedy sample printed at the end."""
    sample_tokens: int = 48
    """Tokens generated for that sample; 0 disables it."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    nan_policy: str = "stop"
    """Non-finite loss: stop (one line, at the next logging step) | skip (drop the micro-batch; pp=1) | rollback (reload the latest checkpoint, never train on that batch again)."""
    nan_max_events: int = 10
    """skip/rollback: stop after this many non-finite events."""
    collective_timeout_s: float = 1800.0
    """Seconds any collective may wait: when a rank dies, the others exit after this long instead of hanging."""
    fused_loss: bool = True
    """LM head and cross-entropy in one op, chunked over tokens, so the full (tokens, vocabulary) logits never sit in memory; false = the plain head then loss."""
    loss_chunk_tokens: int = 0
    """Tokens per chunk of the fused loss; 0 = auto (about 128 M fp32 logits per chunk: 4096 tokens at a 32k vocabulary)."""
    overlap_comm: bool = True
    """ZeRO 1-2 with dp > 1 on GPUs: reduce gradient buckets while backward continues (DeepSpeed overlap_comm; ZeRO-3 always overlaps). Not used on CPU."""
    check_grad_overflow: bool = False
    """bf16: true = DeepSpeed reads every gradient for inf/NaN before each step and skips the step if it finds one (two reductions per tensor and a host sync per step); false (the default: on an H200 it cut a 1.3b step's update from 91 to 39 ms, BENCHMARKS.md) leaves a non-finite gradient to train.nan_policy, which sees it in the loss of a later step, and no checkpoint is written after it. fp16 always checks (its loss scaling needs it)."""
    compile: bool = False
    """torch.compile each transformer block (in place: names and checkpoints unchanged). Off by default (it needs a compiler and compiles for tens of seconds); configs/1.3b.yaml turns it on, where an H200 measured it faster (BENCHMARKS.md); not with ZeRO-3. With parallel.sequence_parallel a compiled block keeps its projections' gathered input whole for backward (eager blocks keep their slice and gather it again)."""


@dataclass
class ParallelConfig:
    """How the model is split over processes; data parallelism takes the rest of the world size."""

    tp: int = 1
    """Tensor-parallel degree (Megatron-style): must divide heads, KV heads, FFN width and vocabulary."""
    pp: int = 1
    """Pipeline-parallel stages (DeepSpeed's 1F1B pipeline engine); ZeRO stage must be 0 or 1 when pp > 1."""
    partition: str = "parameters"
    """How layers are split over stages: parameters (balanced by parameter count) | uniform | blocks (equal blocks per stage) | blocks per stage, e.g. "1,3"."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of storing them (every layer, or the first parallel.checkpoint_layers of each stage)."""
    checkpoint_layers: int = 0
    """With activation_checkpointing: recompute only the first N layers each pipeline stage applies and keep the rest's activations (Megatron's --recompute-method block); 0 recomputes every layer."""
    sequence_parallel: bool = False
    """With tp > 1, hold norms and residuals as (B, T/tp, D) sequence slices (Megatron's sequence parallelism); data.seq_len must divide by tp."""
    cp: int = 1
    """Context-parallel degree: each of cp ranks holds 1/cp of every sequence's tokens (two load-balanced chunks of 2·cp), keys and values all-gathered per layer; pretraining only; data.seq_len must divide by 2·cp."""


@dataclass
class UntieConfig:
    """When tied blocks get their own weights during training (DESIGN.md, "Ties and unties").

    Conditions are evaluated per tie group of the configured plan (model.sharing) after
    every step, identically on every rank. When one holds, the group's units (all, or the
    ones that disagree most with the group) get their own copies of the block's weights
    and Adam moments, and the DeepSpeed engine is rebuilt around the new parameter set.
    """

    when: str = ""
    """Conditions, comma-separated, any one fires: step:N | tokens:F (fraction of the planned tokens, max_steps x tokens per step) | plateau | coherence. '' never unties."""
    groups: str = "all"
    """Tie groups (ids in the configured plan) the conditions apply to: all, or a comma-separated list such as 0,2."""
    per_group: str = ""
    """Per-group conditions that replace `when` for those groups, e.g. "0=coherence;1=step:200"."""
    units: str = "all"
    """Which units of a firing group are untied: all | lowest:k (the k units whose gradients align least with the group's sum; needs probe_every > 0)."""
    plateau_window: int = 50
    """plateau: steps over which the smoothed training loss must improve."""
    plateau_threshold: float = 0.01
    """plateau: fires when the relative improvement of the smoothed loss over the window is below this."""
    plateau_smoothing: float = 0.9
    """plateau: EMA coefficient of the training-loss smoothing (read every train.log_every steps)."""
    probe_every: int = 0
    """Capture the per-unit gradients of every tie group every this many steps (coherence, alignment); 0 = never. Other steps cost nothing."""
    coherence_threshold: float = 0.3
    """coherence: fires when rho = |sum g|^2 / (K sum |g_i|^2) stays below this (1 = units agree, 1/K = orthogonal)."""
    coherence_probes: int = 3
    """coherence: consecutive probes below the threshold needed to fire."""
    min_step: int = 0
    """No untie before this step (plateau and coherence are noisy during warm-up)."""
    moments: str = "copy"
    """Adam moments of an untied block: copy (each copy starts with the shared block's, built from the sum of all K units' gradients) | scale (first moment x k/K, second x (k/K)^2 for a block now applied by k of the K units: the moments of its share of the sum when the units agree, so its first updates are not shrunk by up to K/k) | probe (the factors from the coherence probe's per-unit statistics over its last coherence_probes probes, for units that disagree too; needs untie.probe_every > 0). See megascale/untie/moments.py."""


@dataclass
class MetricsConfig:
    """What is measured and where it goes."""

    peak_tflops: float = 0.0
    """Peak dense TFLOP/s per device for MFU; 0 looks the device up (H100, A100, …) and leaves MFU empty on CPU."""
    tensorboard: bool = True
    """Write TensorBoard event files when tensorboard is installed."""
    plot: bool = True
    """Write loss.png at the end of the run."""
    wandb_project: str = ""
    """Also log to Weights & Biases under this project when wandb is installed ('' = off; never required; WANDB_MODE=offline works)."""
    profile_start: int = 0
    """Run steps profile_start … profile_start + profile_steps - 1 under torch.profiler (0 = off): each rank writes a trace (open in https://ui.perfetto.dev) and a table of its top operators to <train.out_dir>/profile/."""
    profile_steps: int = 2
    """How many steps the profiler window holds (each step adds to every rank's trace)."""


@dataclass
class FinetuneConfig:
    """Trace fine-tuning (launch/finetune_trace.py): (query, trace, response) examples, weighted loss, held-out evaluation.

    The model shape is not configured here: it comes from the `init` checkpoint
    (its vocabulary extended by the template's separator tokens, see megascale/finetune/template.py).
    """

    init: str = ""
    """Pretraining checkpoint to start from (a step_* directory, a checkpoints/ directory or a run directory; any tp/pp/dp layout, tied or untied). --init sets it."""
    train_file: str = ""
    """JSONL of training examples {"query", "trace" (string or list of steps), "response"}; '' generates arithmetic problems."""
    eval_file: str = ""
    """JSONL of held-out examples; '' generates them (in and beyond the training digit range). With a file, every example counts as in-range."""
    trace_weight: float = 1.0
    """Loss weight of trace tokens (and of the marker that ends the trace); 0 trains on the response only."""
    response_weight: float = 1.0
    """Loss weight of response tokens (and of the end-of-example token). Query and padding tokens always weigh 0; the loss is sum(w*ce)/sum(w) per micro-batch."""
    trace_in_input: bool = True
    """Keep the trace in the sequence. False drops it: the model answers right after the query (the direct-answer baseline)."""
    packing: bool = True
    """Pack several examples per sequence (attention never crosses examples; positions restart per example); False pads one example per sequence."""
    skip_bad_examples: bool = False
    """Malformed JSONL lines or over-long examples: False stops with file:line; True counts, logs and skips them."""
    tasks: str = "add,sub,mul"
    """Generated problems: comma-separated subset of add (with carries), sub (with borrows), mul (partial products)."""
    train_examples: int = 20000
    """Generated training examples."""
    train_min_digits: int = 1
    """Fewest digits of the longer operand in generated training problems."""
    train_max_digits: int = 3
    """Most digits of the longer operand in generated training problems (and in the in-range held-out set)."""
    eval_max_digits: int = 5
    """Held-out out-of-range problems have train_max_digits+1 .. eval_max_digits digits (longer than any seen in training)."""
    eval_examples: int = 64
    """Held-out examples per split (in-range, out-of-range) scored by generation at every evaluation (train.eval_every steps)."""
    eval_batch_size: int = 32
    """Prompts generated together (one batched, KV-cached greedy decode)."""
    max_new_tokens: int = 160
    """Generation limit per held-out example (trace + response)."""
    seed: int = 1234
    """Seed of the generated problems (train and held-out sets are disjoint)."""


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model shape and sharing plan."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor and pipeline parallelism."""
    untie: UntieConfig = field(default_factory=UntieConfig)
    """Untying tied blocks during training."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Metrics."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Trace fine-tuning (launch/finetune_trace.py only; pretraining ignores it)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building


def from_dict(data: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, strictly (unknown keys and wrong types raise)."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the config file"
        raise MegascaleError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise MegascaleError(_unknown_key_message(prefix + str(key), names, prefix))
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _unknown_key_message(key: str, names: list[str], prefix: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, names, n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(prefix + n for n in names)}"
    return f"unknown config key '{key}': {hint} (see `launch/pretrain.py --help-config`)"


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if dataclasses.is_dataclass(typ):
        return from_dict(value if value is not None else {}, typ, key + ".")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        value = _yaml11_float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
    if typ is str and isinstance(value, list) and key.endswith(("sharing", "groups")):
        return ",".join(str(v) for v in value)  # a list of ids written as a YAML list
    if typ is str and type(value) is int and key.endswith("groups"):
        return str(value)  # untie.groups=0: one group id reads as an int
    # bool is a subclass of int in Python: reject `true` where a number is expected.
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise MegascaleError(
            f"config key '{key}' expects {typ.__name__}, got {value!r} ({type(value).__name__}); "
            f"fix the value in the YAML file or the override"
        )
    return value


def _yaml11_float(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 without its base-60 integers: '4:2' stays the text it looks like (train.batch_rampup), not 242."""


_INT = "tag:yaml.org,2002:int"
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _INT] for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.max_steps=50'`` → (['train', 'max_steps'], 50). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise MegascaleError(f"override '{text}' is not of the form key.sub=value (e.g. train.max_steps=50)")
    key, raw = text.split("=", 1)
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted ``key=value`` in the nested dict (creating sections as needed)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MegascaleError(f"override '{text}': '{part}' is a value, not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply dotted overrides, build and validate it."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    cfg = from_dict(apply_overrides(data, list(overrides or [])))
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MegascaleError(f"config file '{path}' not found; pass an existing YAML file, e.g. --config configs/tiny.yaml")
    try:
        data = _yaml(path.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise MegascaleError(f"config file '{path}' is not valid YAML{where}; fix the syntax") from None
    return data or {}


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Check relations between fields; raise MegascaleError on the first problem."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    _check(m.d_model > 0 and m.n_layers > 0 and m.n_heads > 0, "model.d_model, model.n_layers and model.n_heads must be positive")
    _check(m.d_model % m.n_heads == 0, f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; pick heads so d_model/heads is an integer (e.g. head dim 64)")
    _check(m.n_kv_heads >= 0 and m.n_heads % m.kv_heads == 0, f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}; use a divisor of n_heads (or 0 for n_heads)")
    _check(m.head_dim % 2 == 0, f"head dim d_model/n_heads={m.head_dim} must be even for RoPE; change model.n_heads")
    _check(m.vocab_size > 0, "model.vocab_size must be positive")
    _check(m.attention in ("auto", "torch", "triton", "triton-tma", "cudnn"),
           f"model.attention='{m.attention}' is not one of auto, torch, triton, triton-tma, cudnn")
    _check(m.fused_ops in ("auto", "torch", "triton"), f"model.fused_ops='{m.fused_ops}' is not one of auto, torch, triton")
    _check_sharing(m)
    _check(d.corpus in ("stdlib", "prepared"), f"data.corpus='{d.corpus}' is not one of stdlib, prepared")
    if d.blend:
        from megascale.data.blend import parse_blend  # noqa: PLC0415 (imports numpy)

        parse_blend(d.blend)  # raises one line on a malformed mix
    _check(0 < d.seq_len <= m.max_seq_len, f"data.seq_len={d.seq_len} must be in 1..model.max_seq_len={m.max_seq_len}; lower data.seq_len or raise model.max_seq_len")
    _check(o.schedule in ("cosine", "linear", "constant", "wsd"), f"optim.schedule='{o.schedule}' is not one of cosine, linear, constant, wsd")
    _check(o.decay_shape in ("1-sqrt", "linear", "cosine"), f"optim.decay_shape='{o.decay_shape}' is not one of 1-sqrt, linear, cosine")
    _check(0 < o.decay_fraction <= 1, f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]: the final fraction of the steps that decays")
    _check(o.lr > 0 and 0 <= o.min_lr_ratio <= 1, "optim.lr must be > 0 and optim.min_lr_ratio in [0, 1]")
    _check(o.warmup_steps >= 0 and o.grad_clip >= 0, "optim.warmup_steps and optim.grad_clip must be >= 0")
    _check(t.precision in PRECISIONS, f"train.precision='{t.precision}' is not one of {', '.join(PRECISIONS)}")
    _check(t.zero_stage in (0, 1, 2, 3), f"train.zero_stage={t.zero_stage} must be 0, 1, 2 or 3")
    _check(t.offload_optimizer in ("none", "cpu"), f"train.offload_optimizer='{t.offload_optimizer}' is not one of none, cpu")
    _check(t.offload_optimizer == "none" or t.zero_stage >= 1,
           "train.offload_optimizer=cpu needs ZeRO: DeepSpeed offloads the optimizer's partition; set train.zero_stage 1, 2 or 3")
    _check(t.init_device in ("auto", "cpu"), f"train.init_device='{t.init_device}' is not one of auto, cpu")
    _check(t.offload_params in ("none", "cpu"), f"train.offload_params='{t.offload_params}' is not one of none, cpu")
    _check(t.offload_params == "none" or t.zero_stage == 3,
           "train.offload_params=cpu needs train.zero_stage=3 (only ZeRO-3 partitions the weights); set train.zero_stage=3")
    _check(t.max_steps > 0 and t.micro_batch_size > 0, "train.max_steps and train.micro_batch_size must be positive")
    _check(not (t.compile and t.zero_stage == 3),
           "train.compile=true cannot be combined with train.zero_stage=3 (ZeRO-3 gathers parameters in hooks inside every block, "
           "which break the compiled graph); use train.zero_stage 0-2 or train.compile=false")
    _check(t.loss_chunk_tokens >= 0, f"train.loss_chunk_tokens={t.loss_chunk_tokens} must be >= 0 (0 = auto)")
    p = cfg.parallel
    _check(p.tp >= 1 and p.pp >= 1 and p.cp >= 1, f"parallel.tp={p.tp}, parallel.pp={p.pp} and parallel.cp={p.cp} must be >= 1")
    _check(p.cp == 1 or d.seq_len % (2 * p.cp) == 0,
           f"parallel.cp={p.cp} needs data.seq_len={d.seq_len} divisible by 2·cp = {2 * p.cp} (two chunks per rank); change one of them")
    _check(p.checkpoint_layers >= 0, f"parallel.checkpoint_layers={p.checkpoint_layers} must be >= 0 (0 = every layer)")
    _check(p.checkpoint_layers == 0 or p.activation_checkpointing,
           f"parallel.checkpoint_layers={p.checkpoint_layers} needs parallel.activation_checkpointing=true; set it, or drop checkpoint_layers")
    _check(p.checkpoint_layers <= m.n_layers,
           f"parallel.checkpoint_layers={p.checkpoint_layers} exceeds model.n_layers={m.n_layers}; use at most n_layers (0 = every layer)")
    if p.pp > 1:
        from megascale.parallel.pipeline import explicit_boundaries  # noqa: PLC0415 (imports torch)

        explicit_boundaries(p.partition, m.n_layers, p.pp)
    _check(
        p.pp == 1 or t.zero_stage <= 1,
        f"train.zero_stage={t.zero_stage} cannot be combined with pipeline parallelism (DeepSpeed's pipeline engine supports ZeRO 0-1); "
        f"set train.zero_stage=1 or parallel.pp=1",
    )
    _check(
        not p.sequence_parallel or d.seq_len % (p.tp * p.cp) == 0,
        f"parallel.sequence_parallel needs data.seq_len={d.seq_len} divisible by parallel.tp={p.tp}"
        + (f" × parallel.cp={p.cp}" if p.cp > 1 else "") + "; change one of them",
    )
    _check(t.nan_policy in ("stop", "skip", "rollback"), f"train.nan_policy='{t.nan_policy}' is not one of stop, skip, rollback")
    _check(t.nan_policy != "skip" or p.pp == 1,
           "train.nan_policy=skip needs parallel.pp=1 (the pipeline engine runs all micro-batches in one call); use rollback")
    _check(t.global_batch_size >= 0, "train.global_batch_size must be >= 0 (0 = micro_batch_size * data-parallel size)")
    parse_batch_rampup(t.batch_rampup)
    _check_finetune(cfg.finetune)
    _check_untie(cfg)
    _check_numbers(cfg)


def _check_numbers(cfg: Config) -> None:
    """Ranges of the numeric settings the relations above do not cover; each a setting that would otherwise fail
    deep inside a run (log_every=0: a modulo by zero; a negative seed: numpy's generator) or train on silently
    (rope_theta=0, beta2=1, a negative weight decay)."""
    m, d, o, t, u = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.untie
    for name, value, ok, rule in (
        ("model.rope_theta", m.rope_theta, m.rope_theta > 0, "> 0 (10000 is Llama's)"),
        ("model.norm_eps", m.norm_eps, m.norm_eps > 0, "> 0 (e.g. 1e-5)"),
        ("model.init_std", m.init_std, m.init_std > 0, "> 0 (e.g. 0.02)"),
        ("model.ffn_dim", m.ffn_dim, m.ffn_dim >= 0, ">= 0 (0 = 8/3 d_model)"),
        ("model.ffn_multiple_of", m.ffn_multiple_of, m.ffn_multiple_of >= 1, ">= 1"),
        ("data.stdlib_max_bytes", d.stdlib_max_bytes, d.stdlib_max_bytes > 0, "> 0"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.beta1", o.beta1, 0 <= o.beta1 < 1, "in [0, 1) (e.g. 0.9)"),
        ("optim.beta2", o.beta2, 0 <= o.beta2 < 1, "in [0, 1) (e.g. 0.95)"),
        ("optim.eps", o.eps, o.eps > 0, "> 0 (e.g. 1e-8)"),
        ("train.seed", t.seed, t.seed >= 0, ">= 0"),
        ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
        ("train.eval_every", t.eval_every, t.eval_every >= 0, ">= 0 (0 disables validation)"),
        ("train.eval_batches", t.eval_batches, t.eval_batches >= 1, ">= 1 (set train.eval_every=0 to skip validation)"),
        ("train.save_every", t.save_every, t.save_every >= 0, ">= 0 (0 = only at the end)"),
        ("train.keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints >= 0, ">= 0 (0 keeps every checkpoint)"),
        ("train.sample_tokens", t.sample_tokens, t.sample_tokens >= 0, ">= 0 (0 disables the sample)"),
        ("train.nan_max_events", t.nan_max_events, t.nan_max_events >= 0, ">= 0 (0 stops at the first)"),
        ("train.collective_timeout_s", t.collective_timeout_s, t.collective_timeout_s > 0, "> 0 seconds"),
        ("untie.plateau_threshold", u.plateau_threshold, u.plateau_threshold >= 0, ">= 0 (a relative improvement)"),
        ("untie.probe_every", u.probe_every, u.probe_every >= 0, ">= 0 (0 = never)"),
        # Above 1 is allowed: rho never exceeds 1, so such a threshold fires after coherence_probes probes.
        ("untie.coherence_threshold", u.coherence_threshold, u.coherence_threshold > 0, "> 0 (rho is in (0, 1])"),
        ("untie.min_step", u.min_step, u.min_step >= 0, ">= 0"),
        ("metrics.peak_tflops", cfg.metrics.peak_tflops, cfg.metrics.peak_tflops >= 0, ">= 0 (0 looks the device up)"),
        ("metrics.profile_start", cfg.metrics.profile_start, cfg.metrics.profile_start >= 0, ">= 0 (0 = no profile)"),
        ("metrics.profile_steps", cfg.metrics.profile_steps, cfg.metrics.profile_steps >= 1, ">= 1"),
    ):
        _check(ok, f"{name}={value} must be {rule}")


def parse_batch_rampup(spec: str) -> list[tuple[int, int]]:
    """'B1:S1,B2:S2' → [(B1, S1), (B2, S2)]: global batch B until step S (steps strictly increasing)."""
    stages = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        batch, _, until = part.partition(":")
        try:
            stage = (int(batch), int(until))
        except ValueError:
            stage = (0, 0)
        _check(stage[0] > 0 and stage[1] > (stages[-1][1] if stages else 0),
               f"train.batch_rampup='{spec}': '{part}' is not BATCH:UNTIL_STEP with both positive and the steps increasing "
               "(e.g. '256:1000,512:3000')")
        stages.append(stage)
    return stages


def _check_untie(cfg: Config) -> None:
    from megascale.untie.conditions import parse_rules  # noqa: PLC0415

    parse_rules(cfg)  # raises on a bad condition, group or unit selection
    from megascale.untie.moments import POLICIES  # noqa: PLC0415

    _check(cfg.untie.moments in POLICIES, f"untie.moments='{cfg.untie.moments}' is not one of {', '.join(POLICIES)}")


def _check_finetune(f: FinetuneConfig) -> None:
    _check(f.trace_weight >= 0 and f.response_weight >= 0, "finetune.trace_weight and finetune.response_weight must be >= 0")
    _check(f.trace_weight > 0 or f.response_weight > 0, "finetune.trace_weight and finetune.response_weight are both 0: nothing would be trained; make one positive")
    tasks = [x.strip() for x in f.tasks.split(",") if x.strip()]
    bad = [x for x in tasks if x not in ("add", "sub", "mul")]
    _check(bool(tasks) and not bad, f"finetune.tasks='{f.tasks}' must be a comma-separated subset of add, sub, mul")
    _check(1 <= f.train_min_digits <= f.train_max_digits <= f.eval_max_digits,
           f"finetune digits must satisfy 1 <= train_min_digits ({f.train_min_digits}) <= train_max_digits ({f.train_max_digits}) <= eval_max_digits ({f.eval_max_digits})")
    _check(f.train_examples > 0 and f.eval_examples > 0 and f.eval_batch_size > 0 and f.max_new_tokens > 0,
           "finetune.train_examples, eval_examples, eval_batch_size and max_new_tokens must be positive")


def _check_sharing(m: ModelConfig) -> None:
    from megascale.model.sharing import SharingPlan  # local: config must not import torch eagerly

    SharingPlan.parse(m.sharing, m.n_layers)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise MegascaleError(message)


# ---------------------------------------------------------------- docs


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (read from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return docs


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per config key: ``key = default  # doc``."""
    lines = []
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"[{prefix}{f.name}] {docs.get(f.name, '')}")
            lines += describe(hints[f.name], prefix + f.name + ".")
        else:
            lines.append(f"  {prefix}{f.name} = {getattr(default, f.name)!r}  # {docs.get(f.name, '')}")
    return lines
