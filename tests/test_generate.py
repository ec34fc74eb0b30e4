"""How generation picks the next token (megascale.model.generate.Sampling), on fixed logits; what scoring refuses.

Greedy, temperature, top-k and top-p are checked against the distributions they
define: which ids can come out at all, and how often each does over many seeded
draws. The CLI on real checkpoints is tested in test_export_hf.py (greedy ids against
Hugging Face's generate on the export) and test_finetune.py (queries against the
fine-tuning run's own evaluation); launch/evaluate.py's scores in test_parallel.py (a tp=2 pp=2
checkpoint's loss against its run's val_loss).
"""

from __future__ import annotations

import pytest
import torch

from megascale.errors import MegascaleError
from megascale.model.generate import Sampling

# One row: logits whose softmax is (0.4, 0.3, 0.2, 0.1, 0, ...) over 8 ids, plus two padded ids
# that are the most likely of all (a fine-tuned vocabulary's unused rows must never come out).
PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1, 1e-9, 1e-9, 1e-9, 1e-9])
LOGITS = torch.cat([PROBS.log(), torch.tensor([10.0, 10.0])]).view(1, 1, 10)
DRAWS = 20_000


def frequencies(sampling: Sampling, seed: int = 0, valid: int = 8) -> torch.Tensor:
    pick = sampling.picker(valid, torch.Generator().manual_seed(seed))
    ids = pick(LOGITS.expand(DRAWS, 1, 10).contiguous())
    return torch.bincount(ids, minlength=10).float() / DRAWS


def expected(probs: list[float]) -> torch.Tensor:
    out = torch.zeros(10)
    out[: len(probs)] = torch.tensor(probs)
    return out / out.sum()


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=2.0, top_k=1), Sampling(temperature=1.0, top_p=0.3)],
                         ids=["temperature-0", "top-k-1", "top-p-below-the-first"])
def test_greedy_choices_take_the_most_likely_valid_id(sampling):
    assert torch.equal(frequencies(sampling), expected([1.0]))
    assert Sampling(temperature=1.0, top_p=0.3).describe() == "sampled at temperature 1, top-p 0.3"
    assert Sampling(top_k=1, temperature=2.0).describe() == "greedy"


def test_without_a_valid_limit_the_padded_ids_win():
    pick = Sampling().picker()
    assert pick(LOGITS).tolist() == [8]


@pytest.mark.parametrize("sampling, probs", [
    (Sampling(temperature=1.0), [0.4, 0.3, 0.2, 0.1]),
    (Sampling(temperature=1.0, top_k=2), [0.4, 0.3]),
    (Sampling(temperature=1.0, top_p=0.6), [0.4, 0.3]),  # 0.4 < 0.6: the second id is needed, not the third
    (Sampling(temperature=1.0, top_p=0.75), [0.4, 0.3, 0.2]),  # 0.4 + 0.3 < 0.75: the third is needed, the fourth not
    (Sampling(temperature=1.0, top_k=3, top_p=0.95), [0.4, 0.3, 0.2]),  # k first, then p over the renormalised three
    (Sampling(temperature=0.5), [0.16, 0.09, 0.04, 0.01]),  # p^(1/T) renormalised
])
def test_draws_follow_the_cut_distribution(sampling, probs):
    freq = frequencies(sampling)
    assert (freq[len(probs):] == 0).all(), freq  # nothing outside the cut, padded ids included
    torch.testing.assert_close(freq, expected(probs), rtol=0, atol=0.015)


def test_a_seed_fixes_the_draws_and_another_changes_them():
    s = Sampling(temperature=1.0)
    assert torch.equal(frequencies(s, seed=3), frequencies(s, seed=3))
    pick = s.picker(8, torch.Generator().manual_seed(1))
    again = s.picker(8, torch.Generator().manual_seed(1))
    other = s.picker(8, torch.Generator().manual_seed(2))
    rows = LOGITS.expand(64, 1, 10).contiguous()
    first = pick(rows)
    assert torch.equal(first, again(rows)) and not torch.equal(first, other(rows))


@pytest.mark.parametrize("sampling, fragment", [
    (Sampling(temperature=-1.0), "--temperature -1"),
    (Sampling(temperature=float("nan")), "--temperature nan"),
    (Sampling(top_k=-2), "--top-k -2"),
    (Sampling(top_p=0.0), "--top-p 0.0"),
    (Sampling(top_p=1.5), "--top-p 1.5"),
])
def test_bad_settings_are_one_line(sampling, fragment):
    with pytest.raises(MegascaleError, match=fragment.replace("-", r"\-").replace(".", r"\.")) as err:
        sampling.check()
    assert "\n" not in str(err.value)


def test_scoring_refuses_another_tokenizer_a_missing_split_and_too_short_windows(tmp_path, data_dir):
    from megascale.data import Tokenizer, prepare_dataset
    from megascale.evaluation import open_split, score

    tokenizer = Tokenizer(data_dir / "tokenizer.model")
    docs = [f"def f{i}(x):\n    return x * {i}\n" * 20 for i in range(100)]
    other = prepare_dataset(docs, tmp_path / "other", vocab_size=300)
    for directory, split, fragment in [(other, "val", "was tokenized with another tokenizer than the model's"),
                                       (data_dir, "test", "has no 'test' split; use one of train, val")]:
        with pytest.raises(MegascaleError, match=fragment) as err:
            open_split(directory, split, tokenizer)
        assert "\n" not in str(err.value)
    model = torch.nn.Linear(1, 1)  # never called: the split is refused first
    with pytest.raises(MegascaleError, match="holds no window of 10000001 tokens; lower --seq-len"):
        score(model, tokenizer, data_dir, "val", 10_000_000, 8, 2)


@pytest.mark.parametrize("flag, value", [("--seq-len", "0"), ("--samples", "0"), ("--batch-size", "-1")])
def test_evaluate_cli_refuses_a_count_below_one_before_loading(flag, value):
    """0 was taken for "the checkpoint's own" --seq-len; every count is checked before the checkpoint is read."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from conftest import ROOT, clean_env  # noqa: PLC0415

    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), "--checkpoint", "/nonexistent", flag, value],
                          env=clean_env(), capture_output=True, text=True, cwd=ROOT)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and errors == [f"error: {flag} {value}: use a positive number"], proc.stderr[-2000:]
