"""The fused RMSNorm, SwiGLU and RoPE kernels against their PyTorch references: outputs and gradients.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set
before the kernel modules are imported) at small, odd shapes: hidden sizes that
are not powers of two, 1 / 7 / 33 rows (across the interpreter's 8-row tiles and
2 backward programs), transposed views, broadcast RoPE tables. With CUDA the same
tests also run at real shapes.

Tolerances are per dtype: atol as a fraction of the reference's largest
magnitude (the gradients of a row reduction sum many terms), plus rtol. The
kernels' backward passes compute in fp32 where the reference rounds
intermediates to the input dtype, so in bf16/fp16 each side carries about one
ulp of its own error. Interpreter caveat: its fp32 → bf16 cast truncates instead
of rounding to nearest, so bf16 results may differ by one more bf16 ulp (2^-7
relative); the bf16 tolerance (2 ulps) allows for it.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from megascale.kernels import rmsnorm, rope, swiglu  # noqa: E402
from megascale.kernels.rmsnorm import RMSNormFunction, rms_norm, rms_norm_reference  # noqa: E402
from megascale.kernels.rope import apply_rope, apply_rope_reference  # noqa: E402
from megascale.kernels.swiglu import swiglu as swiglu_op  # noqa: E402
from megascale.kernels.swiglu import swiglu_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-5

# (atol as a fraction of max |reference|, rtol), by the lowest precision among the inputs.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),  # 2 fp16 ulps
    torch.bfloat16: (1e-2, 1.6e-2),  # 2 bf16 ulps (one from the interpreter's truncating cast)
}
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0, shift=0.0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (shift + scale * torch.randn(*shape, generator=gen, device=DEVICE)).to(dtype)


def _check(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, expected {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    frac, rtol = TOL[dtype]
    atol = frac * max(1.0, float(want.detach().abs().max())) if want.numel() else frac
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _compare(fn, ref, inputs: list[torch.Tensor], dy: torch.Tensor, names: list[str], dtype: torch.dtype) -> None:
    """Output and the gradients of every input, kernel vs reference, with the dtype's tolerance."""
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, dy)
    want = ref(*inputs)
    want_grads = torch.autograd.grad(want, inputs, dy)
    for name, got, exp in zip(["out", *names], [out, *grads], [want, *want_grads]):
        _check(name, got, exp, dtype)


# --- RMSNorm -----------------------------------------------------------------------------------

RMS_SHAPES = [(1, 48), (7, 100), (33, 48), (2, 5, 100)]
RMS_LARGE = [(8192, 4096), (4096, 2048), (3, 1000, 11008), (64, 16384)]  # the last: wider than one block


def _rms_inputs(shape, dtype, w_dtype=None, seed=0):
    x = _randn(*shape, dtype=dtype, seed=seed).requires_grad_()
    w = _randn(shape[-1], dtype=w_dtype or dtype, seed=seed + 1, scale=0.5, shift=1.0).requires_grad_()
    dy = _randn(*shape, dtype=torch.promote_types(w.dtype, dtype), seed=seed + 2)
    return x, w, dy


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", RMS_SHAPES + (RMS_LARGE if CUDA else []), ids=str)
def test_rms_norm_matches_reference(shape, dtype):
    x, w, dy = _rms_inputs(shape, dtype)
    _compare(lambda a, b: rms_norm(a, b, EPS), lambda a, b: rms_norm_reference(a, b, EPS),
             [x, w], dy, ["dx", "dweight"], dtype)


@pytest.mark.parametrize(
    "x_dtype, w_dtype, tol_dtype",
    [(torch.bfloat16, torch.float32, torch.bfloat16), (torch.float16, torch.float16, torch.float16),
     (torch.float16, torch.bfloat16, torch.bfloat16)],
    ids=["bf16-x-fp32-w", "fp16", "fp16-x-bf16-w"],
)
def test_rms_norm_mixed_dtypes_follow_torch_promotion(x_dtype, w_dtype, tol_dtype):
    """The output dtype is torch's promotion of weight · x (fp32 weight, bf16 x → fp32), as in the model."""
    x, w, dy = _rms_inputs((7, 100), x_dtype, w_dtype)
    assert rms_norm(x, w, EPS).dtype == torch.promote_types(w_dtype, x_dtype)
    _compare(lambda a, b: rms_norm(a, b, EPS), lambda a, b: rms_norm_reference(a, b, EPS),
             [x, w], dy, ["dx", "dweight"], tol_dtype)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rms_norm_rounds_to_x_dtype_before_the_weight(x_dtype):
    """With a unit fp32 weight the fp32 output is x̂ rounded to x's dtype: every value representable in it."""
    x = _randn(7, 100, dtype=x_dtype, seed=2)
    y = rms_norm(x, torch.ones(100, device=DEVICE), EPS)
    assert y.dtype == torch.float32 and torch.equal(y, y.to(x_dtype).float())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape, max_block", [((33, 100), 32), ((7, 48), 16), ((1, 100), 64)], ids=str)
def test_rms_norm_rows_wider_than_a_block(shape, max_block, dtype):
    """Rows looped over column blocks (the path for hidden > 8192 on a GPU), with a masked last block."""
    x, w, dy = _rms_inputs(shape, dtype, seed=3)
    _compare(lambda a, b: RMSNormFunction.apply(a, b, EPS, max_block), lambda a, b: rms_norm_reference(a, b, EPS),
             [x, w], dy, ["dx", "dweight"], dtype)


def test_rms_norm_strided_inputs():
    """A row-strided view is read in place; a transposed one (hidden not unit-stride) through a copy."""
    base = _randn(7, 128, seed=4)
    for x in (base[:, :100], _randn(100, 7, seed=5).t()):
        x = x.detach().requires_grad_()
        w = _randn(100, seed=6).requires_grad_()
        _compare(lambda a, b: rms_norm(a, b, EPS), lambda a, b: rms_norm_reference(a, b, EPS),
                 [x, w], _randn(7, 100, seed=7), ["dx", "dweight"], torch.float32)


def test_rms_norm_backward_is_deterministic():
    x, w, dy = _rms_inputs((33, 100), torch.float32, seed=8)
    first = torch.autograd.grad(rms_norm(x, w, EPS), (x, w), dy)
    second = torch.autograd.grad(rms_norm(x, w, EPS), (x, w), dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --- SwiGLU ------------------------------------------------------------------------------------

SWIGLU_SHAPES = [(1,), (7, 100), (33, 48), (3, 5, 1000)]  # the last spans several 2048-element blocks
SWIGLU_LARGE = [(8192, 11008), (16384, 5632), (12345,)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES + (SWIGLU_LARGE if CUDA else []), ids=str)
def test_swiglu_matches_reference(shape, dtype):
    gate = _randn(*shape, dtype=dtype, seed=10, scale=2.0).requires_grad_()
    up = _randn(*shape, dtype=dtype, seed=11).requires_grad_()
    _compare(swiglu_op, swiglu_reference, [gate, up], _randn(*shape, dtype=dtype, seed=12), ["dgate", "dup"], dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's NumPy exp(1000)
def test_swiglu_non_contiguous_and_extreme_gates():
    """Transposed inputs are copied; gates of ±1000 give finite values and gradients (σ saturates)."""
    gate = torch.tensor([-1000.0, -100.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0, 1000.0], device=DEVICE)
    gate = gate.repeat(6, 1).t().requires_grad_()  # (9, 6) transposed view
    up = _randn(6, 9, seed=13).t().requires_grad_()
    dy = _randn(9, 6, seed=14)
    assert not gate.is_contiguous() and not up.is_contiguous()
    _compare(swiglu_op, swiglu_reference, [gate, up], dy, ["dgate", "dup"], torch.float32)
    out = swiglu_op(gate, up)
    assert torch.isfinite(torch.cat([out, *torch.autograd.grad(out, (gate, up), dy)])).all()


# --- RoPE --------------------------------------------------------------------------------------

# (B, H, T, hd): hd 48 has a 24-wide half (not a power of two); T 1, 17, 33 cross 16-row tiles.
ROPE_SHAPES = [(1, 2, 1, 32), (2, 3, 33, 48), (1, 2, 17, 128)]
ROPE_LARGE = [(2, 32, 4096, 128), (4, 8, 2048, 64), (1, 16, 1000, 96)]


def _rope_tables(B, T, hd, broadcast: bool):
    """The model's own tables: (T, hd) for positions 0..T-1, or (B, 1, T, hd) for packed positions."""
    from megascale.model.llama import rope_tables, rope_tables_at

    if not broadcast:
        return rope_tables(hd, T, 10000.0, torch.device(DEVICE))
    positions = torch.arange(T, device=DEVICE).remainder(max(1, T // 2 + 1))  # restarts mid-sequence
    positions = torch.stack([positions + 3 * b for b in range(B)])  # (B, T), differs per row
    return rope_tables_at(positions, hd, 10000.0)


def _rope_x(B, H, T, hd, dtype, transposed: bool, seed=20):
    """x (B, H, T, hd): a transposed view of a (B, T, H, hd) tensor, as the model passes, or contiguous."""
    if transposed:
        return _randn(B, T, H, hd, dtype=dtype, seed=seed).transpose(1, 2).requires_grad_()
    return _randn(B, H, T, hd, dtype=dtype, seed=seed).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("broadcast", [False, True], ids=["table-T-hd", "table-B1Thd"])
@pytest.mark.parametrize("shape", ROPE_SHAPES + (ROPE_LARGE if CUDA else []), ids=str)
def test_rope_matches_reference(shape, broadcast, dtype):
    B, H, T, hd = shape
    x = _rope_x(B, H, T, hd, dtype, transposed=True)
    cos, sin = _rope_tables(B, T, hd, broadcast)
    _compare(lambda a: apply_rope(a, cos, sin), lambda a: apply_rope_reference(a, cos, sin),
             [x], _randn(B, H, T, hd, dtype=dtype, seed=21), ["dx"], dtype)


def test_rope_layouts_and_general_tables():
    """Contiguous x; tables whose halves differ (random); output keeps x's layout; broadcast upstream grad."""
    B, H, T, hd = 2, 3, 19, 40
    cos, sin = _randn(T, hd, seed=22), _randn(B, 1, T, hd, seed=23)
    for transposed in (False, True):
        x = _rope_x(B, H, T, hd, torch.float32, transposed, seed=24)
        out = apply_rope(x, cos, sin)
        assert out.stride() == x.stride()
        dy = _randn(1, H, 1, hd, seed=25).expand(B, H, T, hd)  # zero strides
        _compare(lambda a: apply_rope(a, cos, sin), lambda a: apply_rope_reference(a, cos, sin),
                 [x], dy, ["dx"], torch.float32)


# --- References against the model, unsupported inputs ----------------------------------------


def test_references_are_the_models_code():
    """The references reproduce megascale.model.llama bit for bit (the kernels' spec)."""
    from megascale.model.llama import RMSNorm
    from megascale.model.llama import apply_rope as model_apply_rope

    x = _randn(5, 100, dtype=torch.bfloat16, seed=30)
    norm = RMSNorm(100, EPS).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(_randn(100, seed=31))
        assert torch.equal(norm(x), rms_norm_reference(x, norm.weight, EPS))
    q = _randn(2, 7, 3, 32, dtype=torch.bfloat16, seed=32).transpose(1, 2)
    cos, sin = _rope_tables(2, 7, 32, broadcast=True)
    assert torch.equal(model_apply_rope(q, cos, sin), apply_rope_reference(q, cos, sin))


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "call, reason_fn, expected",
    [
        (lambda: rms_norm(_t(4, 8), _t(7), EPS), lambda: rmsnorm.unsupported_reason(_t(4, 8), _t(7)), "does not match"),
        (lambda: rms_norm(_t(4, 8, dtype=torch.float64), _t(8), EPS),
         lambda: rmsnorm.unsupported_reason(_t(4, 8, dtype=torch.float64), _t(8)), "dtype torch.float64 not in"),
        (lambda: swiglu_op(_t(4, 8), _t(8)), lambda: swiglu.unsupported_reason(_t(4, 8), _t(8)), "differ in shape"),
        (lambda: swiglu_op(_t(4), _t(4, dtype=torch.bfloat16)),
         lambda: swiglu.unsupported_reason(_t(4), _t(4, dtype=torch.bfloat16)), "dtypes differ"),
        (lambda: apply_rope(_t(2, 3, 8), _t(3, 8), _t(3, 8)),
         lambda: rope.unsupported_reason(_t(2, 3, 8), _t(3, 8), _t(3, 8)), "expected x of shape"),
        (lambda: apply_rope(_t(1, 2, 3, 7), _t(3, 7), _t(3, 7)),
         lambda: rope.unsupported_reason(_t(1, 2, 3, 7), _t(3, 7), _t(3, 7)), "not even"),
        (lambda: apply_rope(_t(1, 2, 3, 8), _t(4, 8), _t(3, 8)),
         lambda: rope.unsupported_reason(_t(1, 2, 3, 8), _t(4, 8), _t(3, 8)), "does not broadcast"),
        (lambda: apply_rope(_t(1, 2, 3, 8), _t(2, 1, 3, 8), _t(3, 8)),
         lambda: rope.unsupported_reason(_t(1, 2, 3, 8), _t(2, 1, 3, 8), _t(3, 8)), "does not broadcast"),
        (lambda: apply_rope(_t(1, 2, 3, 8), _t(3, 8, dtype=torch.float64), _t(3, 8)),
         lambda: rope.unsupported_reason(_t(1, 2, 3, 8), _t(3, 8, dtype=torch.float64), _t(3, 8)), "cos dtype"),
    ],
    ids=["rms-weight", "rms-fp64", "swiglu-shape", "swiglu-dtype", "rope-3d", "rope-odd-hd", "rope-table-T",
         "rope-table-B", "rope-table-fp64"],
)
def test_unsupported_inputs_raise_with_reason(call, reason_fn, expected):
    assert expected in reason_fn()
    with pytest.raises(ValueError, match=expected):
        call()


@pytest.mark.parametrize("module", [rmsnorm, swiglu, rope], ids=["rmsnorm", "swiglu", "rope"])
def test_cpu_tensors_need_the_interpreter(module, monkeypatch):
    monkeypatch.setattr(module, "INTERPRET", False)
    args = {rmsnorm: (torch.zeros(2, 8), torch.ones(8)), swiglu: (torch.zeros(8), torch.zeros(8)),
            rope: (torch.zeros(1, 1, 2, 8), torch.zeros(2, 8), torch.zeros(2, 8))}[module]
    assert "needs CUDA" in module.unsupported_reason(*args)
    if CUDA:
        assert module.unsupported_reason(*(a.cuda() for a in args)) is None


# ---------------------------------------------------------------- in the model (model.fused_ops)


@pytest.mark.parametrize("fused_loss", [False, True], ids=["plain-loss", "fused-loss"])
def test_model_with_fused_ops_matches_torch_ops(fused_loss):
    """A tiny Transformer with set_ops_backend('triton') against 'torch': loss and every parameter's gradient.

    With the fused loss, 'triton' also runs its row-wise steps as kernels (megascale.kernels.cross_entropy).
    """
    from megascale.config import ModelConfig
    from megascale.model.llama import Transformer

    cfg = ModelConfig(vocab_size=64, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, sharing="all")
    torch.manual_seed(0)
    model = Transformer(cfg).to(DEVICE)
    model.fused_loss = fused_loss
    model.lm_head.chunk_tokens = 12  # three chunks of the 32 tokens
    tokens, targets = (torch.randint(0, 64, (2, 16), device=DEVICE) for _ in range(2))
    results = []
    for backend in ("torch", "triton"):
        model.set_ops_backend(backend)
        assert model.lm_head.ops == backend
        model.zero_grad()
        loss = model(tokens, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_ops_backend_resolution(monkeypatch):
    from megascale.errors import MegascaleError
    from megascale.model.ops import resolve_ops_backend

    assert resolve_ops_backend("torch", torch.device("cpu")) == ("torch", "requested")
    with pytest.raises(MegascaleError, match="is not one of auto, torch, triton"):
        resolve_ops_backend("fast", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MegascaleError, match="needs a CUDA device"):
        resolve_ops_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_ops_backend("triton", torch.device("cpu"))[0] == "triton"


def test_auto_ops_take_the_kernels_on_cuda_only_for_eager_blocks(monkeypatch):
    """auto: the kernels on CUDA (measured 1.82x at 350m, eager); PyTorch under torch.compile, on CPU (even with
    the interpreter on: it is for tests, orders of magnitude slower), and without Triton."""
    from megascale.model.ops import resolve_ops_backend

    cuda = torch.device("cuda")  # resolution reads the device type only: no GPU needed to test it
    assert resolve_ops_backend("auto", cuda) == ("triton", "auto: CUDA, eager blocks")
    assert resolve_ops_backend("auto", cuda, compiled=True) == ("torch", "auto: train.compile fuses the PyTorch ops")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_ops_backend("auto", torch.device("cpu"))[0] == "torch"
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "triton" else object())
    assert resolve_ops_backend("auto", cuda) == ("torch", "auto: Triton is not installed")


def test_the_loss_rows_keep_the_kernels_under_compile():
    """train.compile compiles the blocks only: auto gives the blocks PyTorch ops there, and the (eager) fused
    loss its row kernels; the model takes the two choices apart."""
    from megascale.config import ModelConfig
    from megascale.model import Transformer
    from megascale.model.llama import LMHead
    from megascale.model.ops import resolve_loss_ops_backend

    cuda = torch.device("cuda")
    assert resolve_loss_ops_backend("auto", cuda) == "triton"
    assert resolve_loss_ops_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_loss_ops_backend("torch", cuda) == "torch"
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=16))
    model.set_ops_backend("torch", "triton")
    ops = {type(m).__name__: m.ops for m in model.modules() if hasattr(m, "ops")}
    assert ops.pop("LMHead") == "triton" and set(ops.values()) == {"torch"}, ops
    model.set_ops_backend("triton")
    assert {m.ops for m in model.modules() if hasattr(m, "ops")} == {"triton"}
    assert isinstance(model.lm_head, LMHead)
