"""Hugging Face export and import (megascale.export.hf, launch/export_hf.py).

Three tiny pretraining runs (tied blocks with tied embeddings; no sharing; tied blocks
under tp=2) are exported, loaded with ``transformers.LlamaForCausalLM`` and
compared with megascale's own ``Transformer`` on the same tokens, in fp32; the export is
imported back (``import_hf``) into an untied model that must give the same logits.
The export reads a checkpoint through ``full_weights``, whose pipeline-stage files
are covered by the layout-conversion and consolidation tests (test_parallel.py), so
the sharded case here is tp=2 alone: 2 processes instead of 4.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch as safetensors_torch
import torch
import transformers

from conftest import ROOT, clean_env, run_pretrain, spawn_ranks
from megascale.config import ModelConfig
from megascale.data import Tokenizer
from megascale.errors import MegascaleError
from megascale.export import export_hf, import_hf, model_config_of
from megascale.export.hf import Stored, lazy_hf_weights, megascale_weights, open_safetensors
from megascale.model.init import Shard, chunk_range, cut
from megascale.model.llama import Transformer
from megascale.train.checkpoint import full_weights, read_meta, resolve_checkpoint

EXPORT = ROOT / "launch" / "export_hf.py"
TOL = 1e-4
TEXT = "def f(x):\n    return {'a': x ** 2}  # ünïcode 123456\n\n\tdone\n"

# name -> (pretrain overrides on top of conftest.TINY (sharing cycle:2, GQA 4q/2kv), processes)
RUNS = {
    "tied": (["model.tie_embeddings=true"], 1),
    "untied": (["model.sharing=none"], 1),
    "tp2": (["parallel.tp=2", "train.zero_stage=1"], 2),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """name -> run directory; each trained once per module, on first use."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            overrides, nproc = RUNS[name]
            out = tmp_path_factory.mktemp(f"run-{name}")
            run_pretrain(out, data_dir, *overrides, nproc=nproc, timeout=600)
            cache[name] = out
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[str, Path]:
    """name -> exported Hugging Face directory (tied: API on the run dir; untied: API on the step dir; tp2: the CLI)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            run = runs(name)
            out = tmp_path_factory.mktemp(f"hf-{name}") / "model"
            if name == "tp2":
                proc = export_cli("--checkpoint", str(run / "checkpoints"), "--out", str(out))
                assert proc.returncode == 0, proc.stderr
                assert f"-> {out}" in proc.stdout and "model.safetensors" in proc.stdout
            elif name == "untied":
                assert export_hf(resolve_checkpoint(str(run), run), out) == out
            else:
                assert export_hf(run, out) == out
            cache[name] = out
        return cache[name]

    return get


def export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXPORT), *args], capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=300)


def megascale_model(run: Path) -> tuple[Transformer, dict]:
    """The checkpoint's own model: its config and sharing plan, weights from full_weights (any layout)."""
    path = resolve_checkpoint(str(run), run)
    meta = read_meta(path)
    model = Transformer(model_config_of(meta))
    model.load_state_dict(full_weights(path, meta))
    return model.eval(), meta


def hf_model(directory: Path):
    return transformers.LlamaForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32).eval()


def tokens_for(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))


def sharpen(model: torch.nn.Module, factor: float = 10.0) -> None:
    """Scale every q/k projection: attention scores x factor^2, so a RoPE layout mismatch cannot hide in near-uniform attention."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(factor)


@pytest.mark.parametrize("name", list(RUNS))
def test_export_matches_megascale_logits(name, runs, exports):
    run, out = runs(name), exports(name)
    ours, meta = megascale_model(run)
    plan = meta["sharing_plan"]

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == len(plan) == 4
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] == (name == "tied")
    assert (config["bos_token_id"], config["eos_token_id"]) == (2, 3)
    note = json.loads((out / "megascale.json").read_text())
    assert note["step"] == meta["step"] and note["sharing_plan"] == plan and note["untie_history"] == []
    assert note["layout"]["tp"] == (2 if name == "tp2" else 1)

    # Tied blocks are expanded: every layer has its own tensors, equal to its group's block.
    tensors = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert ("lm_head.weight" in tensors) == (name != "tied")
    assert len([k for k in tensors if k.startswith("model.layers.")]) == 9 * len(plan)
    for layer, group in enumerate(plan):
        torch.testing.assert_close(tensors[f"model.layers.{layer}.self_attn.q_proj.weight"], ours.blocks[str(group)].attn.q_proj.weight, rtol=0, atol=0)
        torch.testing.assert_close(tensors[f"model.layers.{layer}.mlp.down_proj.weight"], ours.blocks[str(group)].mlp.down_proj.weight, rtol=0, atol=0)

    hf = hf_model(out)
    assert len(hf.model.layers) == 4
    tokens = tokens_for(ours.cfg.vocab_size)
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
        assert diff < TOL, f"{name}: HF logits differ by {diff}"
        sharpen(ours), sharpen(hf)  # tied blocks scale once, their HF copies once each: still the same model
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
        assert diff < TOL, f"{name}, sharpened attention: HF logits differ by {diff}"


def test_rope_layout_is_checked(runs, exports):
    """Negative control: Meta's interleaved-RoPE permutation of q/k (what a layout mismatch would need) breaks parity."""
    ours, _ = megascale_model(runs("untied"))
    hf = hf_model(exports("untied"))
    sharpen(ours), sharpen(hf)

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
        rows, cols = w.shape
        return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    tokens = tokens_for(ours.cfg.vocab_size)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.copy_(permute(layer.self_attn.q_proj.weight, 4))
            layer.self_attn.k_proj.weight.copy_(permute(layer.self_attn.k_proj.weight, 2))
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("name", ["tied", "tp2"])
def test_import_round_trip(name, runs, exports):
    ours, meta = megascale_model(runs(name))
    overrides, state = import_hf(exports(name))
    assert overrides["sharing"] == "none" and overrides["n_layers"] == 4 and overrides["n_kv_heads"] == 2
    assert overrides["tie_embeddings"] == (name == "tied")
    if name == "tied":
        assert state["lm_head.weight"] is state["embed.weight"]
    untied = Transformer(ModelConfig(**overrides, attention="torch"))
    assert list(state) == list(untied.state_dict())  # blocks.0 .. blocks.3: one block per layer
    untied.load_state_dict(state)
    untied.eval()
    assert untied.plan.n_groups == 4 and all(t.dtype == torch.float32 for t in state.values())
    tokens = tokens_for(ours.cfg.vocab_size)
    with torch.no_grad():
        diff = (ours(tokens) - untied(tokens)).abs().max().item()
    assert diff < TOL, f"{name}: imported model's logits differ by {diff}"
    assert ModelConfig(**overrides).hidden_dim == ours.cfg.hidden_dim


def test_import_sharded_transformers_save(exports, tmp_path):
    """A directory written by transformers itself (its own config.json format, weights sharded with an index)."""
    hf = hf_model(exports("untied"))
    hf.save_pretrained(str(tmp_path), max_shard_size="300KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    overrides, state = import_hf(tmp_path)
    ref_overrides, ref_state = import_hf(exports("untied"))
    assert overrides == ref_overrides and state.keys() == ref_state.keys()
    for key in state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=0, atol=0)


def test_lazy_import_reads_each_tensor_when_asked(exports, tmp_path):
    """Training's start-up reader: every check from the safetensors headers, one tensor read per index."""
    src = exports("tied")
    overrides, ref = import_hf(src)
    reads: list[str] = []

    def counted(name: str, entry: Stored) -> Stored:
        return dataclasses.replace(entry, read=lambda: (reads.append(name), entry.read())[1],
                                   read_range=lambda *where: (reads.append((name, *where)), entry.read_range(*where))[1])

    stored = {k: counted(k, v) for k, v in open_safetensors(src).items()}
    weights = megascale_weights(stored, overrides, str(src))
    assert reads == [] and list(weights) == list(ref) and "lm_head.weight" in weights
    assert weights.shape("lm_head.weight") == tuple(ref["embed.weight"].shape)
    q = weights["blocks.1.attn.q_proj.weight"]
    assert reads == ["model.layers.1.self_attn.q_proj.weight"] and q.dtype == torch.float32
    torch.testing.assert_close(q, ref["blocks.1.attn.q_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(weights["lm_head.weight"], ref["embed.weight"], rtol=0, atol=0)  # tied: the embedding
    assert reads[-1] == "model.embed_tokens.weight"
    for shard in (Shard(0, 1, 2), Shard(1, 3, 4)):  # a tensor-parallel rank reads its range alone
        reads.clear()
        torch.testing.assert_close(weights.piece("blocks.2.mlp.down_proj.weight", shard),
                                   cut(ref["blocks.2.mlp.down_proj.weight"], shard), rtol=0, atol=0)
        start, end = chunk_range(ref["blocks.2.mlp.down_proj.weight"].shape[shard.dim], shard)
        assert reads == [("model.layers.2.mlp.down_proj.weight", shard.dim, start, end)]
    head = weights.piece("lm_head.weight", Shard(0, 0, 2))
    torch.testing.assert_close(head, ref["embed.weight"].chunk(2)[0], rtol=0, atol=0)
    assert head.untyped_storage().nbytes() == head.nbytes  # its own copy, not a view into the file

    tensors = safetensors_torch.load_file(str(src / "model.safetensors"))
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.2.mlp.up_proj.weight"].to(torch.int8)
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", tmp_path / "config.json")
    with pytest.raises(MegascaleError, match="up_proj.weight is I8, not floating point"):
        lazy_hf_weights(tmp_path)


def test_tokenizer_loads_in_transformers(exports):
    import sentencepiece as spm

    out = exports("tied")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    ids = tok.encode(TEXT)
    assert ids == sp.encode(TEXT, out_type=int)  # no BOS/EOS added, no dummy prefix, digits split: as trained
    assert tok.decode(ids) == TEXT
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 3, 0, 1)


def test_finetune_separators_are_added_tokens(data_dir, tmp_path):
    from megascale.export import hf as H

    seps = {"<|query|>": 512, "<|trace|>": 513, "<|step|>": 514, "<|response|>": 515}
    tok = H._tokenizer_info(data_dir / "tokenizer.model", True, 576, {"finetune": {"separators": seps}})
    H._write_tokenizer(tmp_path, tok, 64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert {s: hf_tok.convert_tokens_to_ids(s) for s in seps} == seps
    assert 513 in hf_tok.encode("x = 1<|trace|>y")


# ------------------------------------------------------------------ bad input


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_export_refuses_missing_checkpoint(tmp_path):
    line = one_error_line(export_cli("--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "hf")))
    assert "does not exist" in line and "step_*" in line
    line = one_error_line(export_cli("--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")))
    assert "not a megascale checkpoint" in line


def test_export_refuses_foreign_out_dir_and_missing_tokenizer(runs, tmp_path):
    step = resolve_checkpoint(str(runs("untied")), runs("untied"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(MegascaleError, match="not empty"):
        export_hf(step, foreign)
    assert (foreign / "keep.txt").read_text() == "mine"

    moved = tmp_path / step.name  # a checkpoint whose data directory has gone: it carries its own tokenizer
    shutil.copytree(step, moved)
    meta = json.loads((moved / "megascale.json").read_text())
    tokenizer = Path(meta["tokenizer"]["path"])
    assert (moved / meta["tokenizer"]["file"]).read_bytes() == tokenizer.read_bytes()
    meta["tokenizer"]["path"] = str(tmp_path / "gone" / "tokenizer.model")
    (moved / "megascale.json").write_text(json.dumps(meta))
    out = export_hf(moved, tmp_path / "hf")
    assert (out / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    (moved / meta["tokenizer"]["file"]).unlink()  # and without that copy (a checkpoint from before it): one line
    with pytest.raises(MegascaleError, match="--tokenizer"):
        export_hf(moved, tmp_path / "hf2")
    assert export_hf(moved, out, tokenizer=tokenizer) == out  # an earlier export is overwritten


@pytest.mark.parametrize("change, fragment", [
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_parameters": None}, "RoPE scaling 'linear'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "RoPE scaling 'yarn'"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
])
def test_import_refuses_non_llama_config(change, fragment, exports, tmp_path):
    src = exports("untied")
    shutil.copy(src / "model.safetensors", tmp_path / "model.safetensors")
    config = {**json.loads((src / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MegascaleError, match=None) as err:
        import_hf(tmp_path)
    message = str(err.value)
    assert fragment in message and "\n" not in message and ";" in message


def test_import_refuses_bad_directories(exports, tmp_path):
    with pytest.raises(MegascaleError, match="does not exist"):
        import_hf(tmp_path / "nowhere")
    with pytest.raises(MegascaleError, match="no config.json"):
        import_hf(tmp_path)
    src = exports("untied")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    with pytest.raises(MegascaleError, match="neither model.safetensors"):
        import_hf(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MegascaleError, match="safe_serialization=True"):
        import_hf(tmp_path)
    tensors = safetensors_torch.load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MegascaleError, match="q_proj.bias"):
        import_hf(tmp_path)
    del tensors["model.layers.0.self_attn.q_proj.bias"], tensors["model.norm.weight"]
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MegascaleError, match="model.norm.weight"):
        import_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(MegascaleError, match="not a readable safetensors file"):
        import_hf(tmp_path)


# ------------------------------------------------------------------ training from a Hugging Face directory


def test_pretraining_starts_from_a_hugging_face_directory(runs, exports, data_dir, tmp_path):
    from megascale.data import TokenFile, batch_from_indices

    """Under tp=2, so each rank reads its pieces of the safetensors file alone (LazyWeights.piece)."""
    hf = exports("tied")
    out = tmp_path / "from-hf"
    proc = run_pretrain(out, data_dir, f"train.init_hf={hf}", "train.max_steps=1", "train.eval_every=1", "train.eval_batches=2",
                        "parallel.tp=2", "train.zero_stage=1", nproc=2)
    assert "initialised from the Hugging Face model" in proc.stderr
    first_val = next(json.loads(l)["val_loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in l)
    model, _ = megascale_model(runs("tied"))  # the exported checkpoint's own weights
    val = TokenFile(data_dir / "val")
    with torch.no_grad():
        expected = torch.stack([model(*batch_from_indices(val, range(b * 4, (b + 1) * 4), 32)) for b in range(2)]).mean()
    assert first_val == pytest.approx(float(expected), rel=1e-5)


def test_finetuning_starts_from_a_hugging_face_directory(exports, tmp_path):
    from test_finetune import run_finetune

    proc = run_finetune(tmp_path / "ft", exports("untied"), "train.max_steps=2")
    assert "initialised from" in proc.stderr and "hugging face" in proc.stderr
    meta = json.loads((tmp_path / "ft" / "checkpoints" / "step_00000002" / "megascale.json").read_text())
    assert meta["finetune"]["init"] == str(exports("untied").resolve())


# ------------------------------------------------------------------ launch/generate.py

GENERATE = ROOT / "launch" / "generate.py"
PROMPTS = ["def f(x):\n    return", "import os\n", "for i in range(10):\n    "]


def generate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GENERATE), *args], capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=300)


def test_generate_gives_transformers_greedy_tokens(runs, exports, tmp_path):
    """launch/generate.py on the tp=2 checkpoint (its shards merged, its tied blocks kept tied), three prompts of
    different lengths decoded together (left-padded, with a KV cache): for each, the ids Hugging Face's greedy
    ``generate`` gives that prompt alone on the export."""
    out = tmp_path / "greedy.jsonl"
    proc = generate_cli("--checkpoint", str(runs("tp2")), *[a for p in PROMPTS for a in ("--prompt", p)],
                        "--max-new-tokens", "12", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    hf, tok = hf_model(exports("tp2")), Tokenizer(exports("tp2") / "tokenizer.model")
    for prompt, row in zip(PROMPTS, rows, strict=True):
        ids = tok.encode(prompt)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_id,
                               pad_token_id=tok.pad_id)[0, len(ids):].tolist()
        stopped = tok.eos_id in want
        assert row["ids"] == (want[: want.index(tok.eos_id)] if stopped else want) and row["stopped"] == stopped
        assert (row["prompt"], row["completion"], row["prompt_tokens"]) == (prompt, tok.decode(row["ids"]), len(ids))
        assert prompt + row["completion"] in proc.stdout
    assert "3 prompts" in proc.stdout and "on cpu, fp32, greedy" in proc.stdout


def test_generate_samples_the_same_ids_for_the_same_seed(runs, exports, tmp_path):
    """A sampled run from the CLI and the same request in this process (megascale.generation): the same draws;
    and from the checkpoint's Hugging Face export."""
    from megascale.generation import Generator
    from megascale.model.generate import Sampling

    args = ["--temperature", "1.5", "--top-k", "40", "--top-p", "0.9", "--seed", "7", "--batch-size", "2"]
    out = tmp_path / "sampled.jsonl"
    proc = generate_cli("--checkpoint", str(runs("tied")), *[a for p in PROMPTS for a in ("--prompt", p)],
                        "--max-new-tokens", "16", "--json", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    assert "sampled at temperature 1.5, top-k 40, top-p 0.9" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    gen = Generator.from_checkpoint(runs("tied"), device="cpu")
    sampling = Sampling(1.5, 40, 0.9)
    assert [r["ids"] for r in gen.complete(PROMPTS, 16, sampling, seed=7, batch_size=2)] == [r["ids"] for r in rows]
    assert gen.complete(PROMPTS, 16, sampling, seed=8, batch_size=2) != rows  # another seed, other draws
    greedy = gen.complete(PROMPTS, 16, Sampling(), seed=7)
    assert [r["ids"] for r in greedy] != [r["ids"] for r in rows]  # sampled at 1.5, not the argmax

    exported = Generator.from_checkpoint(exports("tied"), device="cpu")  # the export generates as its checkpoint does
    assert exported.source.endswith(f"(exported at step {read_meta(resolve_checkpoint(str(runs('tied')), runs('tied')))['step']})")
    assert exported.complete(PROMPTS, 16, sampling, seed=7, batch_size=2) == gen.complete(PROMPTS, 16, sampling, seed=7, batch_size=2)


@pytest.mark.parametrize("tp, pp, nproc, words", [(2, 1, 2, "tp 2, pp 1"), (1, 2, 2, "tp 1, pp 2"), (1, 1, 2, "tp 1, pp 1, dp 2"),
                                                  (1, 2, 4, "tp 1, pp 2, dp 2")], ids=["tp2", "pp2", "dp2", "pp2dp2"])
def test_generate_split_over_ranks_gives_the_one_process_ids(runs, tmp_path, tp, pp, nproc, words):
    """--tp / --pp: the tied run's model (cycle:2 blocks, tied embeddings) split as training splits it, decoding
    stage to stage under pp; on more ranks than tp × pp the copies share the two batches. The ids of one process,
    greedy and sampled (each batch draws from its own stream of the seed); rank 0 alone reports."""
    from megascale.generation import Generator
    from megascale.model.generate import Sampling

    out, sampled = tmp_path / "split.jsonl", tmp_path / "sampled.jsonl"
    args = [sys.executable, str(GENERATE), "--checkpoint", str(runs("tied")), *[a for p in PROMPTS for a in ("--prompt", p)],
            "--max-new-tokens", "12", "--tp", str(tp), "--pp", str(pp), "--batch-size", "2"]
    proc = spawn_ranks([*args, "--json", str(out)], nproc, clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("3 prompts") == 1 and f"on cpu ×{nproc} ({words}), fp32, greedy" in proc.stdout
    one = Generator.from_checkpoint(runs("tied"), device="cpu")
    assert [json.loads(line)["ids"] for line in out.read_text().splitlines()] == \
        [r["ids"] for r in one.complete(PROMPTS, 12, Sampling(), batch_size=2)]
    proc = spawn_ranks([*args, "--temperature", "1", "--seed", "3", "--json", str(sampled)], nproc, clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["ids"] for line in sampled.read_text().splitlines()] == \
        [r["ids"] for r in one.complete(PROMPTS, 12, Sampling(1.0), seed=3, batch_size=2)]


def test_generate_refuses_what_it_cannot_do_in_one_line(runs, exports, tmp_path):
    from megascale.generation import Generator
    from megascale.model.generate import Sampling

    line = one_error_line(generate_cli("--checkpoint", str(runs("tied")), "--query", "12+34"))
    assert "was not trace fine-tuned" in line and "--prompt" in line
    line = one_error_line(generate_cli("--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"))
    assert "does not exist" in line
    line = one_error_line(generate_cli("--checkpoint", str(runs("tied")), "--prompt", "x", "--tp", "2"))
    assert "1 process for --tp 2 × --pp 1; launch a multiple of tp × pp = 2" in line
    no_tokenizer = tmp_path / "hf"
    shutil.copytree(exports("tied"), no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    with pytest.raises(MegascaleError, match="has no tokenizer.model: generation reads sentencepiece tokenizers"):
        Generator.from_checkpoint(no_tokenizer, device="cpu")
    gen = Generator.from_checkpoint(runs("tied"), device="cpu")
    with pytest.raises(MegascaleError, match="nothing to generate"):
        gen.check_request(0, 0, 8, 8, Sampling())
    with pytest.raises(MegascaleError, match="max_seq_len=32; shorten it or lower --max-new-tokens"):
        gen.complete(["x = 1\n" * 8], 30, Sampling())  # 8 lines of prompt and 30 new tokens: past 32
    assert gen.complete([""], 4, Sampling())[0]["prompt_tokens"] == 1  # an empty prompt starts a document: eos
