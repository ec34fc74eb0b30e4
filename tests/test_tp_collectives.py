"""How many collectives a tensor-parallel block costs: one gather of the input per attention and per MLP.

q, k and v read one input, and so do gate and up. Gathering it (sequence parallelism) or
copying it (without) once for each matrix moved the same bytes three and two times over, in
forward and again in backward; ``ParallelInput`` does it once per attention and once per MLP,
as Megatron's fused QKV and gate-up linears do. Under sequence parallelism backward gathers each
of those two inputs once more, as Megatron does, rather than keep them whole from forward (the
second test measures what that saves). Counted on two gloo ranks, per block: the
difference between a two-layer and a one-layer model's forward and backward. Equal losses
and gradients to one rank are in test_parallel.py.
"""

import json
import sys

import pytest

from conftest import clean_env, spawn_ranks

SCRIPT = r"""
import json, sys
import torch
import torch.distributed as dist
from megascale.config import ModelConfig
from megascale.model.llama import Transformer
from megascale.parallel.tensor_parallel import apply_tensor_parallel

dist.init_process_group("gloo")
sp, kv = sys.argv[1] == "sp", int(sys.argv[2])
calls = {"all_gather": 0, "all_gather_single": 0, "all_reduce": 0, "reduce_scatter": 0, "reduce_scatter_single": 0}
for name in calls:
    original = getattr(dist, name)
    def counted(*args, _name=name, _original=original, **kwargs):
        calls[_name] += 1
        return _original(*args, **kwargs)
    setattr(dist, name, counted)

def count(layers):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=layers, n_heads=4, n_kv_heads=kv, max_seq_len=16, attention="torch")
    model = apply_tensor_parallel(Transformer(cfg, seed=0), dist.group.WORLD, sp, kv_group=dist.group.WORLD if kv == 1 else None)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for name in calls:
        calls[name] = 0
    model(tokens, tokens.roll(-1, 1)).backward()
    return dict(calls)

two, one = count(2), count(1)
if dist.get_rank() == 0:
    print(json.dumps({name: two[name] - one[name] for name in calls}), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.parametrize("mode, kv, expected", [
    # sequence parallel: forward gathers the attention and the MLP input and reduce-scatters their outputs,
    # backward the reverse and gathers the two inputs again for the weight gradients, each collective into
    # or out of one buffer (the *_single calls, not lists of parts); and the two norms' weight gradients,
    # each rank's from its own tokens, are summed
    ("sp", 2, {"all_gather": 0, "all_gather_single": 6, "all_reduce": 2, "reduce_scatter": 0, "reduce_scatter_single": 4}),
    # without: two all-reduces of the outputs forward, two of the inputs' summed gradients backward
    ("no-sp", 2, {"all_gather": 0, "all_gather_single": 0, "all_reduce": 4, "reduce_scatter": 0, "reduce_scatter_single": 0}),
    # tp = 2 over one KV head: and the k and v copies' weight gradients summed over their group
    ("sp", 1, {"all_gather": 0, "all_gather_single": 6, "all_reduce": 4, "reduce_scatter": 0, "reduce_scatter_single": 4}),
])
def test_one_gather_per_attention_and_mlp(tmp_path, mode, kv, expected):
    script = tmp_path / "count.py"
    script.write_text(SCRIPT)
    proc = spawn_ranks([sys.executable, str(script), mode, str(kv)], 2, clean_env(), 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


SAVED = r"""
import json, os, sys
import torch
import torch.distributed as dist
from megascale.config import ModelConfig
from megascale.model.llama import Transformer
from megascale.parallel.tensor_parallel import apply_tensor_parallel
from megascale.train.memory import saved_activation_bytes

dist.init_process_group("gloo")
d, heads, kv, ffn, seq, sp = json.loads(sys.argv[1])

def saved(layers):
    cfg = ModelConfig(vocab_size=64, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn,
                      max_seq_len=seq, attention="torch")
    model = Transformer(cfg, seed=0)
    model.set_ops_backend("triton")  # the fused kernels, as on CUDA (here under Triton's interpreter)
    model = apply_tensor_parallel(model, dist.group.WORLD, sp, kv_group=dist.group.WORLD if kv == 1 else None)
    tokens = torch.randint(0, 64, (2, seq), generator=torch.Generator().manual_seed(0))
    return saved_activation_bytes(model, lambda: model(tokens, tokens.roll(-1, 1)))

per_token = (saved(2) - saved(1)) / (2 * seq)
if dist.get_rank() == 0:
    print(json.dumps(per_token), flush=True)
dist.barrier()
os._exit(0)  # gloo's teardown after the interpreter's kernels sometimes aborts; the result is out
"""


@pytest.mark.parametrize("kv, sp", [(2, True), (1, True), (2, False)], ids=["kv2", "kv1", "kv2-no-sp"])
def test_a_tensor_rank_keeps_what_the_planner_counts(tmp_path, kv, sp):
    """At tp = 2 with sequence parallelism a rank keeps its share of each layer's activations, the attention and
    MLP inputs as its sequence slices (gathered again in backward), and its KV heads whole; without sequence
    parallelism the norms' inputs, outputs and 1/rms whole: megascale.planner.layout.layer_bytes_per_token,
    measured (fp32)."""
    from megascale.planner.layout import layer_bytes_per_token  # noqa: PLC0415
    from megascale.planner.shapes import Shape  # noqa: PLC0415

    script = tmp_path / "saved.py"
    script.write_text(SAVED)
    dims = [32, 4, kv, 96, 16, sp]
    proc = spawn_ranks([sys.executable, str(script), json.dumps(dims)], 2, clean_env(TRITON_INTERPRET="1"), 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    d, heads, kv_heads, ffn, seq, _ = dims
    shape = Shape(64, d, 1, heads, kv_heads, ffn, seq)
    assert measured == pytest.approx(layer_bytes_per_token(shape, "fp32", tp=2, sequence_parallel=sp))


@pytest.mark.parametrize("shape, dim", [((1, 8, 3), 1), ((2, 8, 3), 1), ((1, 1, 8, 3), 2), ((2, 4, 8, 3), 2)],
                         ids=["one-sequence", "micro-batch-2", "context-one-head", "context-heads"])
def test_one_buffer_collectives_lay_out_what_lists_of_parts_did(shape, dim):
    """The sequence-parallel and context-parallel collectives gather into and reduce-scatter out of one rank-major
    buffer: merging it is the concatenation of the ranks' parts and staging is the chunks, with no copy when
    every dimension before the split one has size 1."""
    import torch  # noqa: PLC0415

    from megascale.parallel.mappings import merge_parts, rank_major  # noqa: PLC0415

    world = 4
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    staged = rank_major(x, world, dim)
    assert staged.shape[0] == world and staged.is_contiguous()
    for r, chunk in enumerate(x.chunk(world, dim)):
        assert torch.equal(staged[r], chunk)
    merged = merge_parts(staged, dim)
    assert torch.equal(merged, torch.cat(list(staged.unbind(0)), dim)) and torch.equal(merged, x)
    free = all(n == 1 for n in shape[:dim])
    assert (staged.data_ptr() == x.data_ptr()) == free and (merged.data_ptr() == staged.data_ptr()) == free
