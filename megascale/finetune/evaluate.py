"""Held-out evaluation of trace fine-tuning: generation accuracy and trace metrics.

For each held-out split (``in``: unseen problems of training lengths; ``out``:
longer numbers than any seen in training):

* ``acc_<split>``: response exact match after greedy, KV-cached, batched generation
  from the prompt ``⟨q⟩ query ⟨t⟩`` (the model writes its own trace, then the response);
* ``step_acc_<split>``: generated trace steps equal to the ground-truth step at the
  same index, over max(#generated, #ground-truth) steps — a missing or extra step
  counts as a mismatch;
* ``trace_tok_acc_<split>``, ``trace_loss_<split>``: next-token accuracy (argmax) and
  mean cross-entropy on ground-truth trace tokens under teacher forcing.

Examples are split round-robin over data-parallel ranks (TP peers score the same
ones) and the counts are summed over the data-parallel group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megascale.finetune.arithmetic import Example
from megascale.finetune.data import TRACE, Template
from megascale.model.generate import generate_batch, reduce_logits

log = logging.getLogger(__name__)


@dataclass
class Counts:
    """Sums that make the metrics (so they can be all-reduced over ranks)."""

    correct: float = 0
    examples: float = 0
    step_matches: float = 0
    steps: float = 0
    trace_tok_correct: float = 0
    trace_tokens: float = 0
    trace_loss_sum: float = 0
    samples: list[str] = field(default_factory=list)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.correct, self.examples, self.step_matches, self.steps,
                             self.trace_tok_correct, self.trace_tokens, self.trace_loss_sum], dtype=torch.float64)

    def metrics(self, split: str) -> dict[str, float | None]:
        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        out = {f"acc_{split}": ratio(self.correct, self.examples), f"step_acc_{split}": ratio(self.step_matches, self.steps),
               f"trace_tok_acc_{split}": ratio(self.trace_tok_correct, self.trace_tokens),
               f"trace_loss_{split}": ratio(self.trace_loss_sum, self.trace_tokens)}
        return {k: v for k, v in out.items() if v is not None}


def score_generation(template: Template, generated: list[int], ex: Example) -> tuple[bool, int, int]:
    """(response exactly right, matching steps, steps compared) for one generated continuation."""
    steps, response = template.split_generation(generated)
    truth = [s.strip() for s in ex.trace] if template.trace_in_input else []
    matches = sum(a == b for a, b in zip(steps, truth))
    return response == ex.response.strip(), matches, max(len(steps), len(truth))


def teacher_forced(model, template: Template, examples: list[Example], device) -> tuple[float, float, float]:
    """(correct argmax predictions, tokens, summed cross-entropy) on ground-truth trace tokens."""
    encoded = [template.encode(ex) for ex in examples]
    T = max(len(ids) for ids, _ in encoded)
    tokens = torch.full((len(encoded), T), template.pad_id, dtype=torch.long)
    roles = torch.zeros((len(encoded), T), dtype=torch.long)
    for row, (ids, r) in enumerate(encoded):  # right padding: causal attention never sees it
        tokens[row, : len(ids)], roles[row, : len(ids)] = torch.tensor(ids), torch.tensor(r)
    tokens, roles = tokens.to(device), roles.to(device)
    targets, is_trace = tokens[:, 1:], roles[:, 1:] == TRACE

    def sums(logits: torch.Tensor) -> torch.Tensor:  # logits (B, T-1, V), full vocabulary
        logits = logits.float()
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
        right = (logits.argmax(-1) == targets) & is_trace
        return torch.stack([right.sum(), is_trace.sum(), (ce * is_trace).sum()]).double()

    like = torch.empty(3, dtype=torch.float64, device=device)
    right, count, loss = reduce_logits(model, sums, like, tokens[:, :-1]).tolist()
    return right, count, loss


@torch.no_grad()
def score_split(model, template: Template, examples: list[Example], max_new_tokens: int, batch_size: int,
                dp_rank: int, dp_size: int, stop_early: bool) -> Counts:
    """This rank's share of ``examples``; every rank runs the same number of batches (ZeRO-3 forwards are collective)."""
    device = next(model.parameters()).device
    mine = examples[dp_rank::dp_size]
    per_rank = -(-len(examples) // dp_size)
    counts = Counts()
    for start in range(0, per_rank, batch_size):
        chunk = mine[start : start + batch_size]
        work = chunk or examples[:1]  # a rank with nothing left still runs the forwards, unscored
        generated = generate_batch(model, [template.prompt(ex) for ex in work], max_new_tokens,
                                   stop_id=template.eos_id, pad_id=template.pad_id, stop_early=stop_early)
        tf = teacher_forced(model, template, work, device) if template.trace_in_input else (0.0, 0.0, 0.0)
        if not chunk:
            continue
        for ex, gen in zip(chunk, generated):
            right, matches, steps = score_generation(template, gen, ex)
            counts.correct += right
            counts.examples += 1
            counts.step_matches += matches
            counts.steps += steps
            if len(counts.samples) < 2:
                counts.samples.append(f"{ex.query} → {template.split_generation(gen)}")
        counts.trace_tok_correct += tf[0]
        counts.trace_tokens += tf[1]
        counts.trace_loss_sum += tf[2]
    return counts


def evaluate_splits(model, template: Template, splits: dict[str, list[Example]], max_new_tokens: int,
                    batch_size: int, dp_rank: int, dp_size: int, dp_group, stop_early: bool) -> dict[str, float]:
    """All metrics of all splits, summed over the data-parallel group (every rank gets the same dict)."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    for split, examples in splits.items():
        if not examples:
            continue
        counts = score_split(model, template, examples, max_new_tokens, batch_size, dp_rank, dp_size, stop_early)
        total = counts.as_tensor()
        if dist.is_initialized() and dp_size > 1:
            dist.all_reduce(total, group=dp_group)
        summed = Counts(*total.tolist())
        metrics.update(summed.metrics(split))
        if counts.samples and dp_rank == 0:
            log.info("held-out %s, e.g. %s", split, counts.samples[0])
    model.train(was_training)
    return metrics
