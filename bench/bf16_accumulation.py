"""How far gradients accumulated in bf16 over K micro-batches land from an fp32 sum of the same micro-gradients.

    python bench/bf16_accumulation.py                       # d_model 256, 4 layers, K = 4, 16, 64
    python bench/bf16_accumulation.py --ks 8,32 --json out.json

DeepSpeed's ZeRO-1/2 in bf16 without ``data_types.grad_accum_dtype`` accumulate a step's
micro-batch gradients in bf16: autograd adds each one into the bf16 ``.grad``, each micro-batch's
loss scaled by 1/K first. Megatron keeps fp32 main gradients instead. This measures what that costs
on megascale's model: the same bf16 micro-gradients, once accumulated by autograd in bf16, once
summed in fp32, and the relative error of the first against the second (whole gradient, and the
worst tensor). A precision figure, not a speed one; the device does not change it (CPU is fine).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megascale.config import load_config
from megascale.model.llama import Transformer

ROOT = Path(__file__).resolve().parent.parent


def model_for(args: argparse.Namespace) -> Transformer:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", f"model.n_heads={args.heads}",
        f"model.n_kv_heads={args.heads}", f"model.vocab_size={args.vocab}", f"model.max_seq_len={args.seq}", "model.sharing=none",
        f"data.seq_len={args.seq}"])
    torch.manual_seed(args.seed)
    return Transformer(cfg.model, seed=args.seed).to(torch.bfloat16)


def micro_batches(args: argparse.Namespace, k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed + k)
    return [torch.randint(0, args.vocab, (args.micro, args.seq + 1), generator=g) for _ in range(k)]


def accumulation_error(model: Transformer, batches: list[torch.Tensor]) -> dict[str, float]:
    k = len(batches)
    fp32 = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    for x in batches:  # each micro-gradient alone, summed in fp32
        model.zero_grad(set_to_none=True)
        (model(x[:, :-1], x[:, 1:]) / k).backward()
        for n, p in model.named_parameters():
            fp32[n] += p.grad.float()
    model.zero_grad(set_to_none=True)
    for x in batches:  # autograd's accumulation into the bf16 .grad
        (model(x[:, :-1], x[:, 1:]) / k).backward()
    errors = {n: (p.grad.float() - fp32[n]).norm().item() for n, p in model.named_parameters()}
    norms = {n: fp32[n].norm().item() for n in fp32}
    whole = sum(e * e for e in errors.values()) ** 0.5 / sum(v * v for v in norms.values()) ** 0.5
    return {"k": k, "relative_error": whole, "worst_tensor": max(errors[n] / norms[n] for n in norms if norms[n] > 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", default="4,16,64", help="micro-batches per step to measure")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    model = model_for(args)
    rows = [accumulation_error(model, micro_batches(args, int(k))) for k in args.ks.split(",")]
    print(f"d_model {args.d_model} × {args.layers} layers, micro-batch {args.micro} × {args.seq} tokens, bf16 weights")
    print(f"{'K':>4}  {'relative error':>15}  {'worst tensor':>13}")
    for r in rows:
        print(f"{r['k']:>4}  {r['relative_error']:>15.2e}  {r['worst_tensor']:>13.2e}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
