"""data.blend: prepared corpora mixed by weight, exactly in every prefix, each part repeated or thinned evenly."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import losses, metrics, run_pretrain
from megascale.data import DistributedBatchSampler, prepare_dataset
from megascale.data.blend import Blend, _block_layout, _quota, parse_blend
from megascale.data.sampler import SamplerState
from megascale.data.tokens import TokenFile, TokenFileWriter
from megascale.errors import MegascaleError
from megascale.evaluation import score
from megascale.generation import Generator
from megascale.train.report import write_report

SEQ = 4
VOCAB = 60_000


def numbered_file(prefix: Path, part: int, samples: int) -> TokenFile:
    """A token file whose sample i starts with the token part·10000 + i."""
    with TokenFileWriter(prefix, VOCAB, eos_id=VOCAB - 1) as w:
        w.add(np.repeat(part * 10_000 + np.arange(samples), SEQ))
    return TokenFile(prefix)


@pytest.fixture(scope="module")
def blend(tmp_path_factory) -> Blend:
    root = tmp_path_factory.mktemp("blend")
    files = [numbered_file(root / f"p{d}", d, n) for d, n in enumerate([1000, 30_000, 200])]
    return Blend(files, [5, 3, 2])  # weights 0.5, 0.3, 0.2


def test_parse_normalises_and_refuses_in_one_line():
    parts = parse_blend(" 3 data/a ,1 data/b")
    assert [(p.weight, str(p.path)) for p in parts] == [(0.75, "data/a"), (0.25, "data/b")]
    for spec, fragment in [("data/a", "is not 'WEIGHT PATH'"), ("x data/a", "'x' is not a number"),
                           ("0 data/a, 1 data/b", "must be positive"), ("1 data/a, 2 data/a", "names a directory twice")]:
        with pytest.raises(MegascaleError) as err:
            parse_blend(spec)
        assert fragment in str(err.value) and "\n" not in str(err.value)


def test_every_prefix_holds_each_part_by_its_weight(blend):
    n = blend.num_samples(SEQ)
    assert n == 31_200 - 31_200 % blend.block  # whole blocks of the parts' 31,200 samples
    located = [blend.locate(i, SEQ) for i in range(n)]
    seen = np.zeros(3)
    for i, (part, _) in enumerate(located):
        seen[part] += 1
        assert np.abs(seen - blend.weights * (i + 1)).max() < 3, i
    assert list(blend.counts(SEQ)) == [n // 2, round(0.3 * n), n - n // 2 - round(0.3 * n)]
    first = blend.sample(located.index((2, 0)), SEQ)
    assert first.tolist() == [20_000] * SEQ + [20_001]  # the part's own tokens: sample 0 and the next's first


def test_parts_repeat_or_thin_evenly(blend):
    n = blend.num_samples(SEQ)
    by_part = {d: [local for part, local in (blend.locate(i, SEQ) for i in range(n)) if part == d] for d in range(3)}
    for d, size in [(0, 1000), (2, 200)]:  # weighted above their size: every sample, floor or ceil times
        times = Counter(by_part[d])
        assert set(times) == set(range(size))
        expected = len(by_part[d]) / size
        assert set(times.values()) <= {int(expected), int(expected) + 1}
    thinned = by_part[1]  # 0.3 of the blend from 30,000 samples: each at most once, spread over the whole file
    assert len(set(thinned)) == len(thinned) and max(thinned) > 29_990
    assert max(np.diff(sorted(thinned))) <= 30_000 // len(thinned) + 1


def test_later_epochs_read_the_rest_of_a_thinned_part(blend):
    """Epoch e (blend indices e·N + i) shifts each part's samples by e: the part thinned to every ~3.2nd sample
    is read whole in 4 epochs, the mix of every epoch is the first's, and the sampler hands out such indices."""
    n = blend.num_samples(SEQ)
    epochs = [[blend.locate(e * n + i, SEQ) for i in range(n)] for e in range(4)]
    assert [part for part, _ in epochs[3]] == [part for part, _ in epochs[0]]
    assert all(local == (first + 3) % size for (part, local), (_, first), size in
               ((a, b, [1000, 30_000, 200][a[0]]) for a, b in zip(epochs[3], epochs[0])))
    thinned = [{local for part, local in epoch if part == 1} for epoch in epochs]
    assert len(thinned[0]) == len(thinned[1]) and not thinned[0] & thinned[1]  # a new third of the part
    assert set().union(*thinned) == set(range(30_000))
    assert blend.sample(2 * n + 5, SEQ).tolist() != blend.sample(5, SEQ).tolist()

    sampler = DistributedBatchSampler(n, 8, 8, 0, 1, seed=0, epoch_in_index=True)
    plain = DistributedBatchSampler(n, 8, 8, 0, 1, seed=0)
    sampler.state, plain.state = SamplerState(epoch=2, consumed=0), SamplerState(epoch=2, consumed=0)
    (got,), (want,) = sampler.next_global_batch(), plain.next_global_batch()
    assert got.tolist() == (want + 2 * n).tolist()


def test_a_sample_does_not_depend_on_the_order_asked(blend):
    n = blend.num_samples(SEQ)
    order = list(range(n))
    random.Random(0).shuffle(order)
    in_order = {i: blend.locate(i, SEQ) for i in range(n)}
    _block_layout.cache_clear()
    _quota.cache_clear()
    assert all(blend.locate(i, SEQ) == in_order[i] for i in order[:3000])


def test_a_part_without_a_sample_of_this_length_is_left_out(tmp_path):
    """A small corpus's validation split may hold no window of seq_len + 1 tokens: the others share its weight."""
    full, short = numbered_file(tmp_path / "full", 0, 10), numbered_file(tmp_path / "short", 1, 0)
    mix = Blend([full, short], [1, 1])
    assert mix.num_samples(SEQ) == 10 and [mix.locate(i, SEQ) for i in range(10)] == [(0, i) for i in range(10)]


def test_pretraining_on_a_blend(tmp_path, data_dir):
    """Two corpora sharing the tokenizer train as one; the mix is recorded; another tokenizer is one line."""
    docs = [f"def f{i}(x):\n    return x * {i}\n" * 20 for i in range(200)]
    second = prepare_dataset(docs, tmp_path / "second", vocab_size=512, tokenizer_path=data_dir / "tokenizer.model")
    spec = f"data.blend=0.75 {data_dir}, 0.25 {second}"
    run = tmp_path / "run"
    run_pretrain(run, data_dir, spec, "train.max_steps=3", "train.save_every=3", "train.eval_every=3",
                 "train.eval_batches=2", "metrics.plot=true")
    assert sorted(losses(run)) == [1, 2, 3]
    meta = json.loads((run / "checkpoints" / "step_00000003" / "megascale.json").read_text())
    assert meta["data"]["blend"] == [[0.75, str(data_dir.resolve())], [0.25, str(second.resolve())]]

    # Each part's own validation loss beside the blend's: what launch/evaluate.py scores on the part's
    # validation windows (2 batches of 4) from the final checkpoint.
    evals = [r for r in metrics(run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 3] and list(evals[-1]["val_loss_parts"]) == [str(data_dir), str(second)]
    final = Generator.from_checkpoint(run, device="cpu")
    for path, loss in evals[-1]["val_loss_parts"].items():
        assert score(final.model, final.tokenizer, Path(path), "val", 32, 8, 4).loss == pytest.approx(loss, rel=1e-5)
    assert (run / "loss.png").stat().st_size > 10_000
    page = write_report(run).read_text()  # launch/report.py
    for path in (data_dir, second):
        first, last = evals[0]["val_loss_parts"][str(path)], evals[-1]["val_loss_parts"][str(path)]
        assert f"| validation loss, {path} | {first:.4f} → {last:.4f} |" in page
    run_pretrain(tmp_path / "blend-only", data_dir, spec, "data.eval_parts=false", "train.max_steps=1", "train.eval_every=1",
                 "train.eval_batches=1")
    evals = [r for r in metrics(tmp_path / "blend-only") if "val_loss" in r]
    assert len(evals) == 2 and not any("val_loss_parts" in r for r in evals)

    other = prepare_dataset(docs, tmp_path / "other", vocab_size=300)
    proc = run_pretrain(tmp_path / "bad", data_dir, f"data.blend=1 {data_dir}, 1 {other}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: data.blend: {other} was tokenized with another tokenizer than {data_dir}; prepare it again with")
