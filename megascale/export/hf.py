"""Hugging Face export and import: megascale checkpoints <-> ``transformers`` Llama directories.

``export_hf(checkpoint, out)`` writes a directory that
``transformers.LlamaForCausalLM.from_pretrained(out)`` (or ``AutoModelForCausalLM``)
loads without megascale:

* ``config.json``        a ``LlamaConfig``: ``num_hidden_layers`` counts *applied* layers;
                         RoPE is written both the transformers-4 way (``rope_theta``,
                         ``rope_scaling: null``) and the transformers-5 way (``rope_parameters``);
* ``model.safetensors``  fp32 weights under Hugging Face names. Tied blocks are *expanded*:
                         layer i gets its own copy of block ``sharing_plan[i]``, so the file
                         holds applied, not unique, parameters. With tied embeddings
                         ``lm_head.weight`` is left out (``tie_word_embeddings: true`` makes
                         transformers tie it to ``model.embed_tokens.weight``, as its own
                         ``save_pretrained`` does);
* ``tokenizer.model``    our sentencepiece model, copied, with ``tokenizer_config.json`` and
                         ``special_tokens_map.json`` so ``AutoTokenizer`` / ``LlamaTokenizer``
                         load it (no BOS/EOS added, no dummy prefix, like our ``Tokenizer``).
                         Its ids equal raw sentencepiece's; they differ from
                         ``megascale.data.Tokenizer.encode`` only on text containing a literal
                         U+2581 (our tokenizer spells it in bytes; sentencepiece, and so
                         transformers, reads it as a space). A fine-tuned checkpoint's
                         separator tokens (``<|query|>``, …) are declared as added special
                         tokens at their ids;
* ``megascale.json``     where it came from: source checkpoint, step, tokens, layout,
                         sharing plan, untie history (format ``megascale-hf-export``).

No q/k permutation is applied: megascale's RoPE uses the same rotate-half layout as
``transformers``' Llama (checked by tests/test_export_hf.py, logits agree to < 1e-4 in fp32).

``import_hf(directory)`` reads such a directory (or any plain Llama one: ``config.json``
plus ``model.safetensors`` or a sharded ``model.safetensors.index.json``) and returns the
``ModelConfig`` fields and the plain ``Transformer`` state dict with ``sharing=none``.
Configurations megascale's model cannot represent (biases, scaled RoPE, another activation,
a decoupled head_dim, …) are refused in one line. ``lazy_hf_weights(directory)`` makes the
same checks from the safetensors headers alone and reads each tensor when it is asked for:
training's start-up uses it, so a rank never holds the whole model it cuts its shard from.

Neither direction imports ``transformers``: both read and write JSON and safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megascale.config import ModelConfig
from megascale.errors import MegascaleError
from megascale.model.init import LazyWeights, Shard, Source, chunk_range

EXPORT_FORMAT = "megascale-hf-export"
EXPORT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.model"

# Inside one block: megascale name (under ``blocks.{g}.``) -> Hugging Face name (under ``model.layers.{i}.``).
BLOCK_NAMES = {
    "input_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
# Hugging Face tensors that carry no weights (old checkpoints saved the RoPE table).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ------------------------------------------------------------------ export


def model_config_of(meta: dict[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` a checkpoint's weights belong to: its saved model section with its
    current sharing plan (after any unties) written out as an explicit group list."""
    saved = meta["config"]["model"]
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in saved.items() if k in names})
    cfg.sharing = ",".join(str(g) for g in meta["sharing_plan"])
    cfg.attention = "torch"
    return cfg


def export_hf(checkpoint: Path, out: Path, *, tokenizer: Path | None = None) -> Path:
    """Write checkpoint ``checkpoint`` (a step_* directory, a checkpoints/ directory or a run
    directory; any tp/pp/dp layout and ZeRO stage) as a ``transformers`` Llama directory ``out``.

    ``tokenizer`` overrides the sentencepiece model recorded in the checkpoint (needed when the
    data directory has moved). ``out`` must be new, empty or an earlier export. Returns ``out``.
    """
    from megascale.train.checkpoint import full_weights, read_meta, resolve_checkpoint, tokenizer_path  # noqa: PLC0415 (imports deepspeed lazily)

    out = Path(out)
    path = resolve_checkpoint(str(checkpoint), Path(checkpoint))
    if path is None:
        raise MegascaleError(f"{checkpoint} holds no checkpoint yet; pass a step_* directory, a checkpoints/ directory or a run directory")
    meta = read_meta(path)
    cfg = model_config_of(meta)
    plan = [int(g) for g in meta["sharing_plan"]]
    if len(plan) != cfg.n_layers:
        raise MegascaleError(f"{path}: sharing plan {plan} has {len(plan)} layers but model.n_layers={cfg.n_layers}; the checkpoint is inconsistent")
    tok_path = Path(tokenizer) if tokenizer is not None else tokenizer_path(path, meta)
    tok = _tokenizer_info(tok_path, tokenizer is None, cfg.vocab_size, meta)
    _prepare_out(out, path)

    tensors = hf_state_dict(full_weights(path, meta), plan, cfg.tie_embeddings, where=str(path))
    written = [_write_weights(out / WEIGHTS_NAME, tensors)]
    written.append(_write_json(out / "config.json", hf_config(cfg, tok["ids"])))
    written += _write_tokenizer(out, tok, cfg.max_seq_len)
    note = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "source": str(path.resolve()),
        "step": meta.get("step"),
        "tokens": meta.get("tokens"),
        "layout": meta.get("layout"),
        "sharing": meta["config"]["model"].get("sharing"),
        "sharing_plan": plan,
        "unique_blocks": len(set(plan)),
        "applied_layers": len(plan),
        "untie_history": meta.get("untie_history", []),
        "params": meta.get("params"),
        "tokenizer": {"source": str(tok_path.resolve()), "vocab_size": tok["vocab_size"],
                      "added_tokens": {name: i for i, name in sorted(tok["added"].items())}},
        **({"finetune": meta["finetune"]} if "finetune" in meta else {}),
        "files": sorted(p.name for p in written),
    }
    _write_json(out / "megascale.json", note)  # last: its presence marks a complete export
    return out


def hf_config(cfg: ModelConfig, special_ids: dict[str, int]) -> dict[str, Any]:
    """``config.json`` of a ``LlamaForCausalLM`` with megascale model ``cfg``'s shape (applied layers)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": "float32",
        **{f"{name}_token_id": i for name, i in special_ids.items()},
    }


def hf_state_dict(state: dict[str, torch.Tensor], plan: list[int], tie_embeddings: bool, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The plain-model state dict ``state`` under Hugging Face names, tied blocks expanded per layer (fp32, contiguous, unshared)."""
    groups = sorted(set(plan))
    expected = {f"blocks.{g}.{name}" for g in groups for name in BLOCK_NAMES} | {"embed.weight", "norm.weight", "lm_head.weight"}
    missing = sorted(expected - state.keys())
    extra = sorted(state.keys() - expected)
    if missing:
        raise MegascaleError(f"{where}: weights {missing[:4]} are missing for sharing plan {plan}; the checkpoint is incomplete or from another model")
    if extra:
        raise MegascaleError(f"{where}: tensors {extra[:4]} have no place in a Hugging Face Llama; export supports the Llama blocks of megascale.model.llama only")

    def own(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.float32).contiguous().clone()  # one storage per name: safetensors refuses shared ones

    out = {"model.embed_tokens.weight": own(state["embed.weight"])}
    for layer, g in enumerate(plan):
        for ours, theirs in BLOCK_NAMES.items():
            out[f"model.layers.{layer}.{theirs}"] = own(state[f"blocks.{g}.{ours}"])
    out["model.norm.weight"] = own(state["norm.weight"])
    if not tie_embeddings:
        out["lm_head.weight"] = own(state["lm_head.weight"])
    return out


def _prepare_out(out: Path, source: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MegascaleError(f"output directory {out} is a file; pass a new or empty directory")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise MegascaleError(f"output directory {out} is inside the checkpoint {source}; pass a directory outside it")
    if out.is_dir() and any(out.iterdir()):
        note = out / "megascale.json"
        try:
            ours = json.loads(note.read_text()).get("format") == EXPORT_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise MegascaleError(f"output directory {out} is not empty and not an earlier megascale export; pass a new or empty directory")
        note.unlink()  # an incomplete overwrite must not look complete
        for stale in (INDEX_NAME, "tokenizer.json"):
            (out / stale).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _tokenizer_info(path: Path, recorded: bool, vocab_size: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Check the sentencepiece model to ship; its special pieces and the fine-tuning separators."""
    import sentencepiece as spm  # noqa: PLC0415

    from megascale.data.tokenizer import Tokenizer  # noqa: PLC0415

    if not path.is_file():
        where = "recorded in the checkpoint's megascale.json " if recorded else ""
        raise MegascaleError(f"tokenizer '{path}' {where}does not exist; pass --tokenizer PATH/tokenizer.model (the run's data directory has it)")
    Tokenizer(path)  # raises one line when unreadable or without EOS
    sp = spm.SentencePieceProcessor(model_file=str(path))
    n = sp.get_piece_size()
    if n > vocab_size:
        raise MegascaleError(f"tokenizer {path} has {n} pieces but the model only {vocab_size} embedding rows; pass the tokenizer the model was trained with (--tokenizer)")
    ids = {name: getattr(sp, f"{name}_id")() for name in ("bos", "eos", "pad", "unk")}
    ids = {name: i for name, i in ids.items() if i >= 0}
    # Fine-tuning separators live right after the pretraining vocabulary; transformers numbers added
    # tokens from the tokenizer's size on, so they can be declared only when the two sizes agree.
    separators = {int(i): str(name) for name, i in meta.get("finetune", {}).get("separators", {}).items()}
    if sorted(separators) != list(range(n, n + len(separators))):
        separators = {}
    return {
        "path": path,
        "vocab_size": n,
        "ids": {k: v for k, v in ids.items() if k != "unk"},
        "pieces": {name: sp.id_to_piece(i) for name, i in ids.items()},
        "piece_ids": ids,
        "added": separators,
    }


def _write_tokenizer(out: Path, tok: dict[str, Any], max_len: int) -> list[Path]:
    """Copy the sentencepiece model; write the configs that make transformers' LlamaTokenizer encode like it."""
    target = out / TOKENIZER_NAME
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(tok["path"], tmp)
    os.replace(tmp, target)
    added = {tok["piece_ids"][name]: piece for name, piece in tok["pieces"].items()}
    added.update(tok["added"])
    special = {f"{name}_token": piece for name, piece in tok["pieces"].items()}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "sp_model_kwargs": {},
        "model_max_length": max_len,
        "added_tokens_decoder": {
            str(i): {"content": piece, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
            for i, piece in sorted(added.items())
        },
    }
    if tok["added"]:
        config["additional_special_tokens"] = [name for _, name in sorted(tok["added"].items())]
    special_map = dict(special)
    if tok["added"]:
        special_map["additional_special_tokens"] = config["additional_special_tokens"]
    return [target, _write_json(out / "tokenizer_config.json", config), _write_json(out / "special_tokens_map.json", special_map)]


def _write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file  # noqa: PLC0415

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ import


def import_hf(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a Hugging Face Llama directory (``config.json`` + safetensors, single or sharded).

    Returns ``(overrides, state)``: ``overrides`` are ``ModelConfig`` fields (vocab_size,
    d_model, n_layers, n_heads, n_kv_heads, ffn_dim, max_seq_len, rope_theta, norm_eps,
    tie_embeddings, sharing='none'; ``ModelConfig(**overrides)`` builds the model), and
    ``state`` is the plain ``Transformer`` state dict (``blocks.{i}.…`` per layer, fp32;
    with tied embeddings ``lm_head.weight`` is ``embed.weight``, the same tensor).
    Raises ``MegascaleError`` (one line, with the fix) for what megascale cannot represent.
    """
    overrides, weights = lazy_hf_weights(directory)
    return overrides, weights.to_dict()


def lazy_hf_weights(directory: Path) -> tuple[dict[str, Any], LazyWeights]:
    """``import_hf`` without reading the weights: every check is made from the headers, and each
    tensor is read (and cast to fp32) when indexed, as training's start-up does one at a time."""
    directory = Path(directory)
    overrides = hf_model_overrides(directory)
    return overrides, megascale_weights(open_safetensors(directory), overrides, str(directory))


def is_hf_directory(path: Path) -> bool:
    """A Hugging Face model directory: megascale checkpoints and run directories never hold a config.json."""
    return (Path(path) / "config.json").is_file()


def with_hf_model(cfg, directory: Path):
    """``cfg`` with its model section replaced by the shape of the Hugging Face model in ``directory`` (untied).

    Starting from a pretrained Llama means training *that* model: its shape is not ours to choose.
    The attention backend and init settings stay the config's.
    """
    import dataclasses  # noqa: PLC0415

    from megascale.config import validate  # noqa: PLC0415

    out = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **hf_model_overrides(directory)))
    validate(out)
    return out


def hf_model_overrides(directory: Path) -> dict[str, Any]:
    """The ``ModelConfig`` fields of a Hugging Face Llama directory, from its config.json alone (no weights read)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MegascaleError(f"Hugging Face directory '{directory}' does not exist; pass a directory with config.json and model.safetensors")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise MegascaleError(f"{directory} has no config.json: not a Hugging Face model directory; pass one written by save_pretrained")
    try:
        hf = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MegascaleError(f"{config_path} is unreadable ({type(err).__name__}); restore it from the model's source") from None
    if not isinstance(hf, dict):
        raise MegascaleError(f"{config_path} is not a JSON object; restore it from the model's source")
    return llama_overrides(hf, str(config_path))


def llama_overrides(hf: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """``ModelConfig`` fields for a Hugging Face Llama ``config.json``; refuses, in one line, what megascale's model cannot represent."""

    def refuse(problem: str, fix: str) -> MegascaleError:
        return MegascaleError(f"{where}: {problem}; {fix}")

    model_type = hf.get("model_type")
    if model_type != "llama":
        raise refuse(f"model_type {model_type!r} is not 'llama'", "megascale imports LlamaForCausalLM checkpoints only; convert the model to Llama first")
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in archs:
        raise refuse(f"architectures {archs} has no LlamaForCausalLM", "export the causal-LM model (with its lm_head), e.g. AutoModelForCausalLM.save_pretrained")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        value = hf.get(key)
        if type(value) is not int or value <= 0:
            raise refuse(f"{key}={value!r} is not a positive integer", "fix config.json")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    if type(kv) is not int or kv <= 0 or heads % kv:
        raise refuse(f"num_key_value_heads={kv!r} does not divide num_attention_heads={heads}", "fix config.json")
    if d % heads:
        raise refuse(f"hidden_size={d} is not a multiple of num_attention_heads={heads}", "megascale needs head_dim = hidden_size / heads")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != d // heads:
        raise refuse(f"head_dim={head_dim} differs from hidden_size/num_attention_heads={d // heads}",
                     "megascale's attention derives head_dim from the width; pick a model with head_dim = hidden_size / heads")
    if (d // heads) % 2:
        raise refuse(f"head_dim={d // heads} is odd", "RoPE needs an even head_dim")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise refuse(f"hidden_act={act!r} is not silu", "megascale's MLP is SwiGLU (silu); pick a model with hidden_act 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise refuse(f"{key}=true", "megascale's projections have no biases; pick a model without them")
    if hf.get("quantization_config"):
        raise refuse("the weights are quantized", "dequantize them (save_pretrained of the model loaded in float16/bfloat16/float32) first")
    rope_theta = _check_rope(hf, refuse)
    eps = hf.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise refuse(f"rms_norm_eps={eps!r} is not a positive number", "fix config.json")
    max_pos = hf.get("max_position_embeddings", 2048)
    if type(max_pos) is not int or max_pos <= 0:
        raise refuse(f"max_position_embeddings={max_pos!r} is not a positive integer", "fix config.json")
    return {
        "vocab_size": hf["vocab_size"],
        "d_model": d,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": kv,
        "ffn_dim": hf["intermediate_size"],
        "max_seq_len": max_pos,
        "rope_theta": float(rope_theta),
        "norm_eps": float(eps),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "sharing": "none",
    }


def _check_rope(hf: dict[str, Any], refuse) -> float:
    """RoPE base of plain (unscaled, full-width) rotary embeddings; refuses every other kind."""
    params = hf.get("rope_parameters")  # transformers 5
    scaling = hf.get("rope_scaling")  # transformers 4
    theta = hf.get("rope_theta", 10000.0)
    for spec in (params, scaling):
        if spec is None:
            continue
        if not isinstance(spec, dict) or "full_attention" in spec:
            raise refuse(f"rope parameters {spec!r} are not one plain RoPE", "megascale implements unscaled RoPE only")
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise refuse(f"RoPE scaling '{kind}' ({spec})", "megascale implements unscaled RoPE only; pick a model without rope_scaling")
        theta = spec.get("rope_theta", theta)
        if spec.get("partial_rotary_factor", 1.0) != 1.0:
            raise refuse(f"partial_rotary_factor={spec['partial_rotary_factor']}", "megascale rotates the full head dimension")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse(f"partial_rotary_factor={hf['partial_rotary_factor']}", "megascale rotates the full head dimension")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise refuse(f"rope_theta={theta!r} is not a positive number", "fix config.json")
    return theta


@dataclass(frozen=True)
class Stored:
    """One tensor of a safetensors file, known by its header; ``read()`` loads it from the memory map."""

    shape: tuple[int, ...]
    dtype: str  # safetensors' spelling: "BF16", "F32", "I8", …
    read: Callable[[], torch.Tensor]  # a view of the memory map: copy it before keeping or changing it
    read_range: Callable[[int, int, int], torch.Tensor]  # (dim, start, end): that range alone, also a view


def open_safetensors(directory: Path) -> dict[str, Stored]:
    """Every tensor of ``model.safetensors`` or of the shards ``model.safetensors.index.json`` lists, unread.

    Only the headers are read here; the files stay memory-mapped until the entries are dropped.
    """
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return _open_file(single)
    if index.is_file():
        return _open_index(index)
    if any(directory.glob("pytorch_model*.bin")):
        raise MegascaleError(f"{directory} holds PyTorch .bin weights only; re-save it with model.save_pretrained(dir, safe_serialization=True)")
    raise MegascaleError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; pass a Hugging Face model directory with safetensors weights")


def _open_file(path: Path) -> dict[str, Stored]:
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    if not path.is_file():
        raise MegascaleError(f"{path} is missing: the model directory is incomplete; download or copy it again")
    try:
        handle = safe_open(str(path), framework="pt")  # checks the header against the file's size
        entries = {}
        for name in handle.keys():
            piece = handle.get_slice(name)
            entries[name] = Stored(tuple(piece.get_shape()), piece.get_dtype(), lambda n=name: handle.get_tensor(n),
                                   lambda dim, start, end, n=name: handle.get_slice(n)[(slice(None),) * dim + (slice(start, end),)])
        return entries
    except (SafetensorError, OSError, ValueError) as err:
        raise MegascaleError(f"{path} is not a readable safetensors file ({type(err).__name__}); download or copy it again") from None


def _open_index(index: Path) -> dict[str, Stored]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise MegascaleError(f"{index} is not a safetensors index (no weight_map); download or copy it again") from None
    entries: dict[str, Stored] = {}
    for name in files:
        shard = _open_file(index.parent / name)
        entries.update({k: v for k, v in shard.items() if weight_map.get(k) == name})
    absent = sorted(set(weight_map) - entries.keys())
    if absent:
        raise MegascaleError(f"{index} lists {absent[:3]} but its shards do not hold them; download or copy the model again")
    return entries


def megascale_weights(stored: dict[str, Stored], overrides: dict[str, Any], where: str = "model") -> LazyWeights:
    """Hugging Face Llama tensors -> the plain ``Transformer`` weights with one block per layer (sharing none).

    Names, shapes and dtypes are checked from the headers; each tensor is read and cast to
    fp32 only when the returned ``LazyWeights`` is indexed.
    """
    cfg = ModelConfig(**overrides)
    wanted = _wanted(cfg)
    missing = [k for k in wanted if k not in stored]
    if missing:
        raise MegascaleError(f"{where}: weights {missing[:3]} ({len(missing)} missing) are not in the safetensors files; "
                             "the directory is incomplete or its config.json describes another model")
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = sorted(k for k in stored.keys() - wanted.keys() if k not in ignorable and not k.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise MegascaleError(f"{where}: tensors {extra[:3]} ({len(extra)} in all) have no place in megascale's Llama; "
                             "the model is not a plain Llama (biases? extra modules?)")
    sources = {}
    for theirs, (ours, shape) in wanted.items():
        entry = stored[theirs]
        if entry.shape != shape:
            raise MegascaleError(f"{where}: {theirs} has shape {entry.shape}, config.json implies {shape}; the weights do not match the config")
        if not entry.dtype.startswith(("F", "BF")):
            raise MegascaleError(f"{where}: {theirs} is {entry.dtype}, not floating point (quantized?); dequantize the model first")
        sources[ours] = Source(lambda e=entry: _owned(e.read()), shape, lambda shard, e=entry: _piece(e, shard))
    aliases = {"lm_head.weight": "embed.weight"} if cfg.tie_embeddings else {}
    return LazyWeights({k: sources[k] for k in _order(cfg) if k not in aliases}, aliases)


def _owned(view: torch.Tensor) -> torch.Tensor:
    """An fp32 copy: safetensors hands out views of its memory map, which a parameter must not keep."""
    return view.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _piece(entry: Stored, shard: Shard) -> torch.Tensor:
    """One tensor-parallel rank's piece, read alone: 1/tp of the bytes."""
    start, end = chunk_range(entry.shape[shard.dim], shard)
    return _owned(entry.read_range(shard.dim, start, end))


def _wanted(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Hugging Face name -> (megascale name, shape) of every tensor a Llama with ``cfg`` holds."""
    d, f, v, hd = cfg.d_model, cfg.hidden_dim, cfg.vocab_size, cfg.head_dim
    shapes = {
        "input_norm.weight": (d,), "post_attn_norm.weight": (d,),
        "attn.q_proj.weight": (cfg.n_heads * hd, d), "attn.k_proj.weight": (cfg.kv_heads * hd, d),
        "attn.v_proj.weight": (cfg.kv_heads * hd, d), "attn.o_proj.weight": (d, cfg.n_heads * hd),
        "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
    }
    wanted = {"model.embed_tokens.weight": ("embed.weight", (v, d)), "model.norm.weight": ("norm.weight", (d,))}
    if not cfg.tie_embeddings:
        wanted["lm_head.weight"] = ("lm_head.weight", (v, d))
    for layer in range(cfg.n_layers):
        for ours, theirs in BLOCK_NAMES.items():
            wanted[f"model.layers.{layer}.{theirs}"] = (f"blocks.{layer}.{ours}", shapes[ours])
    return wanted


def _order(cfg: ModelConfig) -> list[str]:
    """State-dict keys in ``Transformer.state_dict()`` order."""
    return ["embed.weight", *(f"blocks.{i}.{n}" for i in range(cfg.n_layers) for n in BLOCK_NAMES), "norm.weight", "lm_head.weight"]
