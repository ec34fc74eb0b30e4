"""Trace fine-tuning: roles and weights, packing isolation, KV-cache generation, scoring, data, resume, init layouts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, clean_env, free_port, losses, run_pretrain, spawn_ranks
from megascale.config import ModelConfig
from megascale.errors import MegascaleError
from megascale.finetune import data as fd
from megascale.finetune.arithmetic import Example, add_example, arithmetic_splits, mul_example, sub_example
from megascale.finetune.evaluate import score_generation
from megascale.model import Transformer
from megascale.model.generate import generate_batch, greedy_generate
from megascale.model.llama import CrossEntropy

FINETUNE = ROOT / "launch" / "finetune_trace.py"
# Small problems so examples fit 64 tokens; no generation evaluation unless a test asks for it.
FT = [
    "data.seq_len=64", "optim.lr=1e-3", "optim.warmup_steps=2", "train.micro_batch_size=4", "train.global_batch_size=8",
    "train.max_steps=6", "train.log_every=1", "train.eval_every=0", "train.sample_tokens=0", "train.progress=false",
    "metrics.tensorboard=false", "metrics.plot=false", "finetune.train_examples=400", "finetune.train_max_digits=2",
    "finetune.eval_max_digits=3", "finetune.eval_examples=8", "finetune.max_new_tokens=40",
]


def tiny_model(vocab: int = 576, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64, sharing="cycle:2")
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def template(data_dir):
    from megascale.data import Tokenizer

    return fd.Template(Tokenizer(data_dir / "tokenizer.model"), base_vocab=512)


EXAMPLE = Example("12+34", ("2+4+0=6 6", "1+3+0=4 46"), "46")


# ------------------------------------------------------------------ roles and weights


def test_template_roles(template):
    ids, roles = template.encode(EXAMPLE)
    prompt = template.prompt(EXAMPLE)
    assert ids[: len(prompt)] == prompt and prompt[0] == template.query_id and prompt[-1] == template.trace_id
    assert roles[: len(prompt)] == [fd.QUERY] * len(prompt)
    r = ids.index(template.response_id)
    assert set(roles[len(prompt) : r + 1]) == {fd.TRACE}  # trace steps, step separators and ⟨r⟩
    assert ids.count(template.step_id) == 1
    assert set(roles[r + 1 :]) == {fd.RESPONSE} and ids[-1] == template.eos_id
    direct = fd.Template(template.tokenizer, 512, trace_in_input=False)
    ids_d, roles_d = direct.encode(EXAMPLE)
    assert fd.TRACE not in roles_d and direct.prompt(EXAMPLE)[-1] == direct.response_id


def _rows(template, trace_w, resp_w, packing=True):
    enc = [template.encode(EXAMPLE), template.encode(Example("5*7", ("5*7=35",), "35"))]
    return fd.pack(enc, 63, template.pad_id, packing, fd.weights_by_role(trace_w, resp_w))


def test_query_tokens_contribute_exactly_zero(template):
    rows = _rows(template, 1.0, 1.0)
    inputs, targets, weights, docs, pos = rows.batch([0])
    logits = torch.randn(*targets.shape, 576, requires_grad=True)
    CrossEntropy()(logits, targets, weights).backward()
    zero = weights == 0
    assert zero.any() and (logits.grad[zero] == 0).all()  # query and padding targets: exactly no gradient
    assert (logits.grad[~zero].abs().sum(-1) > 0).all()
    roles = torch.from_numpy(rows.roles[:1, 1:])
    assert (weights[roles == fd.QUERY] == 0).all() and (weights[roles == fd.PAD] == 0).all()


def test_weights_scale_trace_and_response(template):
    torch.manual_seed(0)
    inputs, targets, _, _, _ = _rows(template, 1.0, 1.0).batch([0])
    logits = torch.randn(*targets.shape, 576)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    roles = torch.from_numpy(_rows(template, 1, 1).roles[:1, 1:])
    t, r = ce[roles == fd.TRACE], ce[roles == fd.RESPONSE]
    for tw, rw in [(1.0, 1.0), (2.0, 0.5), (0.0, 1.0), (1.0, 0.0)]:
        _, _, w, _, _ = _rows(template, tw, rw).batch([0])
        want = (tw * t.sum() + rw * r.sum()) / (tw * len(t) + rw * len(r))
        torch.testing.assert_close(CrossEntropy()(logits, targets, w), want, rtol=1e-6, atol=1e-6)


def _vocab_parallel_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    from megascale.parallel.tensor_parallel import VocabParallelCrossEntropy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 10, 64), torch.randint(0, 64, (3, 10))
    weights = torch.rand(3, 10) * (torch.rand(3, 10) > 0.3)
    local = logits.chunk(world, dim=-1)[rank].clone().requires_grad_(True)
    loss = VocabParallelCrossEntropy(64, dist.group.WORLD)(local, targets, weights)
    loss.backward()
    dense = logits.clone().requires_grad_(True)
    want = CrossEntropy()(dense, targets, weights)
    want.backward()
    queue.put((rank, float(loss - want), float((local.grad - dense.grad.chunk(world, dim=-1)[rank]).abs().max())))
    dist.destroy_process_group()


def test_vocab_parallel_cross_entropy_weighted_matches_dense():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_vocab_parallel_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for _, dloss, dgrad in results:
        assert abs(dloss) < 1e-6 and dgrad < 1e-7


# ------------------------------------------------------------------ packing and generation


def test_packing_keeps_examples_apart(template):
    model = tiny_model()
    a, b = template.encode(EXAMPLE), template.encode(Example("98-9", ("18-9-0=9 9", "9-0-1=8 89"), "89"))
    alone = fd.pack([a], 63, template.pad_id, True, (0, 0, 1, 1)).batch([0])
    packed = fd.pack([b, a], 63, template.pad_id, True, (0, 0, 1, 1))
    assert len(packed.tokens) == 1  # both in one row
    with torch.no_grad():
        x, _, _, docs, pos = alone
        out_alone = model(x, doc_ids=docs, positions=pos)[0, : len(a[0]) - 1]
        x, _, _, docs, pos = packed.batch([0])
        out_packed = model(x, doc_ids=docs, positions=pos)[0, len(b[0]) : len(b[0]) + len(a[0]) - 1]
        plain = model(alone[0])[0, : len(a[0]) - 1]  # the pretraining path (causal, positions 0..T-1)
    torch.testing.assert_close(out_packed, out_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, out_alone, rtol=1e-5, atol=1e-5)


def test_padding_mode_one_example_per_row(template):
    rows = _rows(template, 1, 1, packing=False)
    assert len(rows.tokens) == 2 and (rows.docs.max(axis=1) == 0).all()


def test_batched_kv_generation_matches_plain_greedy():
    model = tiny_model(seed=3)
    prompts = [[5, 9, 13], [7, 8, 9, 10, 11, 12, 40], [100], [3, 200, 4, 5]]
    batched = generate_batch(model, prompts, 12, stop_id=-1)
    for prompt, got in zip(prompts, batched):
        assert got == greedy_generate(model, prompt, 12)
    stop = batched[1][4]
    cut = generate_batch(model, prompts, 12, stop_id=stop)
    assert cut[1] == batched[1][: batched[1].index(stop)]


# ------------------------------------------------------------------ scoring and data


def test_scoring_known_outputs(template):
    def gen(steps, response):
        ids = []
        for i, s in enumerate(steps):
            ids += ([template.step_id] if i else []) + template.tokenizer.encode(s)
        return ids + [template.response_id] + template.tokenizer.encode(response)

    assert score_generation(template, gen(EXAMPLE.trace, "46"), EXAMPLE) == (True, 2, 2)
    assert score_generation(template, gen(EXAMPLE.trace, "47"), EXAMPLE) == (False, 2, 2)
    assert score_generation(template, gen(["2+4+0=6 6"], "46"), EXAMPLE) == (True, 1, 2)  # a missing step is wrong
    assert score_generation(template, gen(["2+4+0=6 6", "x", "y"], "4"), EXAMPLE) == (False, 1, 3)  # extra steps too
    assert score_generation(template, template.tokenizer.encode("46"), EXAMPLE) == (False, 0, 2)  # no ⟨r⟩: no response


def _check_trace(ex: Example) -> None:
    op = next(c for c in "+-*" if c in ex.query)
    a, b = map(int, ex.query.split(op))
    assert int(ex.response) == {"+": a + b, "-": a - b, "*": a * b}[op]
    assert ex.trace[-1].endswith(ex.response) or ex.trace[-1].endswith(ex.response.zfill(len(ex.trace[-1].split()[-1])))


def test_generator_traces_and_length_split():
    assert add_example(472, 389).trace == ("2+9+0=11 1", "7+8+1=16 61", "4+3+1=8 861")
    assert sub_example(503, 78).trace == ("13-8-0=5 5", "10-7-1=2 25", "5-0-1=4 425")
    assert mul_example(734, 26).trace == ("734*6=4404", "734*20=14680", "4404+14680=19084")
    s = arithmetic_splits(["add", "sub", "mul"], 500, 100, 1, 3, 5, seed=0)
    for ex in s.train + s.eval_in + s.eval_out:
        _check_trace(ex)
    assert max(e.digits for e in s.train) == 3 and min(e.digits for e in s.eval_out) == 4
    assert not {e.query for e in s.train} & {e.query for e in s.eval_in}


def test_bad_lines_reported_or_skipped(tmp_path):
    f = tmp_path / "train.jsonl"
    good = json.dumps({"query": "1+1", "trace": "1+1+0=2 2", "response": "2"})
    f.write_text("\n".join([good, "{not json", json.dumps({"query": "1+2", "response": "3"}), good]) + "\n")
    with pytest.raises(MegascaleError, match=r"train\.jsonl:2: not valid JSON.*skip_bad_examples"):
        fd.read_jsonl(f, skip_bad=False)
    examples, bad = fd.read_jsonl(f, skip_bad=True)
    assert len(examples) == 2 and bad == 2 and examples[0].trace == ("1+1+0=2 2",)


def test_extend_vocab_mean_rows_and_tp_divisible():
    assert fd.extended_vocab_size(2048) == 2112 and fd.extended_vocab_size(512) == 576 and fd.extended_vocab_size(61) == 128
    w = torch.randn(512, 8)
    out = fd.extend_vocab({"embed.weight": w, "lm_head.weight": w}, 576)
    assert out["embed.weight"] is out["lm_head.weight"] and out["embed.weight"].shape == (576, 8)
    torch.testing.assert_close(out["embed.weight"][-1], w.mean(0))


# ------------------------------------------------------------------ runs (subprocesses)


def run_finetune(out_dir: Path, init: Path, *overrides: str, nproc: int = 1, check: bool = True):
    args = ["--config", str(ROOT / "configs" / "trace_tiny.yaml"), "--init", str(init), *FT, f"train.out_dir={out_dir}", *overrides]
    cmd = [sys.executable, str(FINETUNE), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=600) if nproc == 1 \
        else spawn_ranks(cmd, nproc, clean_env(), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"finetune failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("pre")
    run_pretrain(out, data_dir, "train.max_steps=2")
    return out / "checkpoints"


def test_finetune_resumes_exactly(tmp_path, pretrained):
    run_finetune(tmp_path / "full", pretrained, "train.save_every=3")
    run_finetune(tmp_path / "resumed", pretrained, f"train.resume={tmp_path / 'full' / 'checkpoints' / 'step_00000003'}")
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]  # fp32: bit-identical after the resume
    meta = json.loads((tmp_path / "full" / "checkpoints" / "step_00000003" / "megascale.json").read_text())
    assert meta["finetune"]["separators"]["<|query|>"] == 512 and meta["config"]["model"]["vocab_size"] == 576


def test_init_from_a_moved_checkpoint_reads_its_own_tokenizer(tmp_path, pretrained):
    """A checkpoint carries its tokenizer: fine-tuning starts from a copy whose data directory is gone."""
    step = pretrained / (pretrained / "latest").read_text().strip()
    moved = tmp_path / step.name
    shutil.copytree(step, moved)
    meta = json.loads((moved / "megascale.json").read_text())
    original = Path(meta["tokenizer"]["path"]).read_bytes()
    meta["tokenizer"]["path"] = str(tmp_path / "gone" / "tokenizer.model")
    (moved / "megascale.json").write_text(json.dumps(meta))
    run_finetune(tmp_path / "ft", moved, "train.max_steps=1")
    saved = tmp_path / "ft" / "checkpoints" / "step_00000001"
    assert (saved / "tokenizer.model").read_bytes() == original  # and passed on to the fine-tuned checkpoint


def eval_records(out_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "acc_in" in r]


def held_out_samples(proc) -> list[str]:
    """The generated continuations the run logged ("held-out in, e.g. 78*60 → ..."), without timestamps."""
    return [line.split("held-out ", 1)[1] for line in (proc.stdout + proc.stderr).splitlines() if "held-out " in line and "e.g." in line]


def assert_same_evaluation(got: Path, expected: Path, rel: float = 1e-5) -> None:
    """Both runs' held-out metrics at every evaluation, key by key."""
    a, b = eval_records(got), eval_records(expected)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 2]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for key in rb:
            assert ra[key] == pytest.approx(rb[key], rel=rel, abs=1e-7), (ra["step"], key)


def test_init_from_untied_tp2_checkpoint(tmp_path, data_dir):
    """A checkpoint saved with tp=2 and untied blocks starts a tp=1 and a tp=2 fine-tune with the same loss.

    The tp=2 run uses sequence parallelism: it trains on T/tp slices and evaluates (generation,
    teacher forcing) on whole sequences, with the tp=1 run's metrics and generated text.
    """
    pre = tmp_path / "pre"
    run_pretrain(pre, data_dir, "train.max_steps=2", "parallel.tp=2", "model.sharing=none", nproc=2)
    one = run_finetune(tmp_path / "tp1", pre, "train.max_steps=2", "train.eval_every=2")
    two = run_finetune(tmp_path / "tp2", pre, "train.max_steps=2", "train.eval_every=2", "parallel.tp=2",
                       "parallel.sequence_parallel=true", nproc=2)
    l1, l2 = losses(tmp_path / "tp1"), losses(tmp_path / "tp2")
    assert abs(l1[1] - l2[1]) < 1e-4 and abs(l1[2] - l2[2]) < 1e-4
    evals = eval_records(tmp_path / "tp1")
    assert all(0 <= r["acc_in"] <= 1 and "trace_tok_acc_out" in r for r in evals)
    assert_same_evaluation(tmp_path / "tp2", tmp_path / "tp1", rel=1e-4)
    assert held_out_samples(two) == held_out_samples(one) and len(held_out_samples(one)) == 4


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, pretrained):
    """Two steps and two evaluations on one process: what every layout below must give. (out_dir, process)"""
    out = tmp_path_factory.mktemp("ft") / "one"
    return out, run_finetune(out, pretrained, "train.max_steps=2", "train.eval_every=2")


def assert_same_finetune(out: Path, proc, one_rank) -> None:
    """Losses (rel 1e-5), held-out metrics and the generated samples the run logged, as the 1-rank run's."""
    one_dir, one = one_rank
    l1, l2 = losses(one_dir), losses(out)
    assert sorted(l2) == [1, 2] and all(l2[s] == pytest.approx(l1[s], rel=1e-5) for s in (1, 2)), (l1, l2)
    assert_same_evaluation(out, one_dir)
    assert held_out_samples(proc) == held_out_samples(one) and len(held_out_samples(one)) == 4


def test_pipeline_finetune_matches_one_stage(tmp_path, pretrained, one_rank):
    """pp=2: packed rows cross the stage boundary with their doc_ids and positions, the last stage takes the
    weighted loss, and evaluation generates stage to stage: losses, metrics and generated text as at pp=1."""
    two = run_finetune(tmp_path / "pp2", pretrained, "train.max_steps=2", "train.eval_every=2", "parallel.pp=2", nproc=2)
    assert_same_finetune(tmp_path / "pp2", two, one_rank)

    # launch/generate.py answers the final evaluation's logged queries from the pp=2 checkpoint (its stages
    # joined) with the trace steps and response the evaluation generated.
    logged = [sample.split("e.g. ", 1)[1].split(" → ", 1) for sample in held_out_samples(two)[-2:]]
    out = tmp_path / "answers.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "generate.py"), "--checkpoint", str(tmp_path / "pp2"),
                           *[a for query, _ in logged for a in ("--query", query)], "--max-new-tokens", "40",
                           "--json", str(out)], capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [str((a["trace"], a["response"])) for a in answers] == [answer for _, answer in logged]
    assert [a["query"] for a in answers] == [query for query, _ in logged] and f"response: {answers[0]['response']}" in proc.stdout


@pytest.mark.parametrize("layout", [("parallel.cp=2",), ("parallel.pp=2", "parallel.cp=2")], ids=["cp2", "pp2cp2"])
def test_context_parallel_finetune_matches_one_rank(tmp_path, pretrained, one_rank, layout):
    """cp=2: each rank holds half of every packed row. Its queries take their rows of the block-diagonal mask
    against the gathered keys, and its weighted loss is scaled by its share of the row's weights (a query's
    tokens weigh 0, so the halves weigh differently); evaluation generates on whole sequences, the cp ranks
    scoring examples of their own. With the pipeline, the doc ids and positions cross the stages sharded."""
    nproc = 2 * (2 if "parallel.pp=2" in layout else 1)
    proc = run_finetune(tmp_path / "cp", pretrained, "train.max_steps=2", "train.eval_every=2", *layout, nproc=nproc)
    assert_same_finetune(tmp_path / "cp", proc, one_rank)
