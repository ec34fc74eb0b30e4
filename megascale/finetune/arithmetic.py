"""Embedded fine-tuning data: arithmetic problems with step-by-step traces (no downloads).

Three tasks, each written the way a person does it on paper, one step per column
(Nye et al. 2021, "Show Your Work: Scratchpads for Intermediate Computation"):

* ``add``: column addition from the right with carries. A step is
  ``a+b+carry=sum partial`` where ``partial`` is the result so far, so the last
  step already holds the answer: ``472+389`` → ``2+9+0=11 1``, ``7+8+1=16 61``,
  ``4+3+1=8 861`` → ``861``.
* ``sub`` (a >= b): column subtraction with borrows; a borrowed column shows the
  ten it took: ``1a-b-borrow=digit partial``.
* ``mul``: partial products of the longer number by each digit of the shorter
  one (times its power of ten), then their running sum.

Difficulty is the digit count of the longer operand. Training problems have
``train_min..train_max`` digits; the held-out set has an in-range split (same
lengths, problems never seen in training) and an out-of-range split with
``train_max+1..eval_max`` digits, which measures length generalisation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS = ("add", "sub", "mul")


@dataclass(frozen=True)
class Example:
    """One (query, ground-truth trace, ground-truth response) triple."""

    query: str
    trace: tuple[str, ...]  # the intermediate steps, in order
    response: str
    digits: int = 0  # difficulty (0: unknown, e.g. read from a file)


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def add_example(a: int, b: int) -> Example:
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry, partial = [], 0, ""
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        partial = str(total % 10) + partial
        steps.append(f"{x}+{y}+{carry}={total} {partial}")
        carry = total // 10
    if carry:
        partial = "1" + partial
        steps.append(f"0+0+1=1 {partial}")
    return Example(f"{a}+{b}", tuple(steps), str(a + b), max(len(xs), len(ys)))


def sub_example(a: int, b: int) -> Example:
    a, b = max(a, b), min(a, b)
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, borrow, partial = [], 0, ""
    for i in range(len(xs)):
        x, y = int(xs[i]), int(ys[i]) if i < len(ys) else 0
        if x - y - borrow < 0:
            steps.append(f"1{x}-{y}-{borrow}={10 + x - y - borrow} " + (partial := str(10 + x - y - borrow) + partial))
            borrow = 1
        else:
            steps.append(f"{x}-{y}-{borrow}={x - y - borrow} " + (partial := str(x - y - borrow) + partial))
            borrow = 0
    return Example(f"{a}-{b}", tuple(steps), str(a - b), len(xs))


def mul_example(a: int, b: int) -> Example:
    """a × b with b the shorter factor: one partial product per digit of b, then their running sum."""
    a, b = max(a, b), min(a, b)
    steps, total = [], 0
    for power, digit in enumerate(str(b)[::-1]):
        part = a * int(digit) * 10**power
        steps.append(f"{a}*{int(digit) * 10**power}={part}")
        if power:
            steps.append(f"{total}+{part}={total + part}")
        total += part
    return Example(f"{a}*{b}", tuple(steps), str(a * b), len(str(a)))


def random_example(rng: random.Random, task: str, digits: int) -> Example:
    a = _number(rng, digits)
    if task == "mul":
        # The second factor has at most 2 digits: partial products stay few, the trace short.
        return mul_example(a, _number(rng, rng.randint(1, min(2, digits))))
    b = _number(rng, rng.randint(1, digits))
    return add_example(a, b) if task == "add" else sub_example(a, b)


def generate(n: int, tasks: list[str], min_digits: int, max_digits: int, seed: int,
             exclude: set[str] | None = None) -> list[Example]:
    """``n`` problems, tasks and digit counts uniform, deterministic in ``seed``; queries in ``exclude`` are skipped."""
    rng = random.Random(seed)
    exclude = exclude or set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n and attempts < 50 * n:
        attempts += 1
        ex = random_example(rng, rng.choice(tasks), rng.randint(min_digits, max_digits))
        if ex.query not in exclude:
            out.append(ex)
    return out


@dataclass
class ArithmeticSplits:
    train: list[Example]
    eval_in: list[Example]
    eval_out: list[Example]


def arithmetic_splits(tasks: list[str], n_train: int, n_eval: int, train_min: int, train_max: int,
                      eval_max: int, seed: int) -> ArithmeticSplits:
    """Training problems and the two held-out splits (in-range: unseen problems; out-of-range: longer numbers)."""
    train = generate(n_train, tasks, train_min, train_max, seed)
    seen = {ex.query for ex in train}
    eval_in = generate(n_eval, tasks, train_min, train_max, seed + 1, exclude=seen)
    eval_out = generate(n_eval, tasks, train_max + 1, eval_max, seed + 2) if eval_max > train_max else []
    return ArithmeticSplits(train, eval_in, eval_out)
