"""Generate text from a megascale checkpoint: saved under any layout, tied or untied, pretrained or trace fine-tuned.

    python launch/generate.py --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 64
    python launch/generate.py --checkpoint runs/trace-tiny --query "Compute 17 + 5 * 3."
    python launch/generate.py --checkpoint CKPT --prompt-file prompts.jsonl --temperature 0.8 --top-p 0.95 --json out.jsonl
    deepspeed --num_gpus 4 launch/generate.py --checkpoint CKPT --tp 2 --pp 2 --prompt "def main("
    deepspeed --num_gpus 8 launch/generate.py --checkpoint CKPT --tp 2 --prompt-file prompts.jsonl   # 4 copies share the batches

One process: the full weights are read from the checkpoint's files as export and
consolidation read them (tensor shards merged, pipeline stages joined, ZeRO
partitions gathered), with the tokenizer the checkpoint carries. A model too big for
one device runs on tp × pp ranks under any launcher, split as training splits it,
whatever layout saved it; rank 0 prints. Launched on a multiple of tp × pp ranks,
the copies of the model share the batches round-robin (data parallelism). Prompts are
decoded together in batches with a KV cache; each stops at the end-of-document
token or after --max-new-tokens. Temperature 0 (the default) is greedy: the
tokens of the end-of-run sample and of fine-tuning's evaluation. Otherwise each
token is drawn from the tempered distribution, cut to --top-k and --top-p; each
batch draws from its own stream of the seed, so the same seed and batch size give
the same text on any number of ranks.

--query formats a question as trace fine-tuning does (query, then the trace
separator) and prints the trace steps and the response apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="text to continue (repeat for several)")
    p.add_argument("--prompt-file", type=Path, action="append", default=[],
                   help=".jsonl: one prompt per line, its \"prompt\" field; any other file: the whole file is one prompt")
    p.add_argument("--query", action="append", default=[],
                   help="a question for a trace fine-tuned checkpoint (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the fewest most likely tokens whose probability reaches p (1: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (with --temperature > 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--json", type=Path, default=None, help="also write one JSON line per prompt here")
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    from megascale.errors import MegascaleError

    prompts = list(args.prompt)
    for path in args.prompt_file:
        if not path.is_file():
            raise MegascaleError(f"--prompt-file {path} does not exist; pass a text or .jsonl file")
        text = path.read_text(encoding="utf-8")
        if path.suffix != ".jsonl":
            prompts.append(text)
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MegascaleError(f"{path}:{n} is not a JSON object with a \"prompt\" string; write one per line") from None
            if not isinstance(prompt, str):
                raise MegascaleError(f"{path}:{n}: \"prompt\" is not a string; write the text to continue")
            prompts.append(prompt)
    return prompts


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from megascale.model.generate import Sampling  # noqa: PLC0415 (imports torch)

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    prompts = read_prompts(args)
    gen, reports = common.open_model(args)
    gen.check_request(len(prompts), len(args.query), args.max_new_tokens, args.batch_size, sampling)
    start = time.perf_counter()
    results = gen.complete(prompts, args.max_new_tokens, sampling, args.seed, args.batch_size)
    results += gen.answer(args.query, args.max_new_tokens, sampling, args.seed, args.batch_size)
    seconds = time.perf_counter() - start
    if not reports:
        return 0  # every rank computed the same results; one says them
    for i, r in enumerate(results, 1):
        print(f"=== {i}/{len(results)} · {r['prompt_tokens']} prompt tokens · {r['new_tokens']} new"
              f"{' (stopped at end of document)' if r['stopped'] else ''} ===")
        if "query" in r:
            print(f"query: {r['query']}")
            for n, step in enumerate(r["trace"], 1):
                print(f"  {n}. {step}")
            print(f"response: {r['response']}")
        else:
            print(r["prompt"] + r["completion"])
    new = sum(r["new_tokens"] for r in results)
    print(f"{len(results)} prompts, {new} new tokens in {seconds:.2f} s ({new / max(seconds, 1e-9):.1f} tokens/s) "
          f"on {gen.device}{gen.split_words}, {gen.dtype_name}, {sampling.describe()}; {gen.source}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    common.setup_logging()
    common.exit_with(common.run(main, sys.argv[1:]))
