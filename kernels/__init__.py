"""Triton kernels, each beside its pure-PyTorch reference.

Installed as ``megascale.kernels`` (see setup.py). Import the op modules
themselves; this package imports nothing, so it loads without Triton or a GPU.

* ``megascale.kernels.attention`` — fused (flash) attention, forward and
  backward: ``flash_attention(q, k, v, causal=True, softmax_scale=None)``,
  ``attention_reference``, ``unsupported_reason(q, k, v)``,
  ``unsupported_config(head_dim, dtype, device)``. The model reaches it through
  ``megascale.model.attention``, whose backend switch selects it on CUDA.
* ``megascale.kernels.tied_grad`` — the shared-weight gradient reduction of tied
  blocks: ``tied_grad_reduce(contributions, grads)`` → ``TiedGradStats``,
  ``coherence``, ``unit_alignment``, ``tied_grad_reduce_reference``, and
  ``flatten_for_collective`` / ``unflatten_into`` for one collective per tie group.
* ``megascale.kernels.rmsnorm`` — fused RMSNorm, forward and backward (dx and a
  deterministic two-stage dweight): ``rms_norm(x, weight, eps)``,
  ``rms_norm_reference``, ``unsupported_reason(x, weight)``.
* ``megascale.kernels.swiglu`` — fused ``silu(gate) * up``, forward and backward
  (silu recomputed): ``swiglu(gate, up)``, ``swiglu_reference``,
  ``unsupported_reason(gate, up)``.
* ``megascale.kernels.rope`` — fused rotary embedding (rotate-half layout) on
  strided (B, H, T, hd) views with (T, hd) or (B, 1, T, hd) tables, forward and
  backward: ``apply_rope(x, cos, sin)``, ``apply_rope_reference``,
  ``unsupported_reason(x, cos, sin)``.

* ``megascale.kernels.cross_entropy`` — the fused loss's row-wise steps over a
  chunk of logits, in place: ``row_stats(logits, targets, vocab_start)`` →
  (log-sum-exp, target logit), ``softmax_grad_(logits, targets, lse, factors,
  vocab_start)``, their ``*_reference``s, ``unsupported_reason``. Called by
  ``megascale.model.head_loss`` with ``model.fused_ops=triton``.

The rmsnorm, swiglu and rope references are the model's own ops
(``megascale.model.ops``, whose ``model.fused_ops=triton`` switch calls these
kernels), and the kernels reproduce their semantics.

All run on CUDA, or on CPU tensors when ``TRITON_INTERPRET=1`` is set before
they are imported (how the tests run them without a GPU).
"""

KERNELS = ("attention", "tied_grad", "rmsnorm", "swiglu", "rope", "cross_entropy")
