"""Data layer: corpus, tokenizer, token files, sampler, preparation, CLI."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from megascale.data import (
    DistributedBatchSampler,
    SamplerState,
    TokenFile,
    TokenFileWriter,
    Tokenizer,
    batch_from_indices,
    ensure_stdlib_dataset,
    load_manifest,
    prepare_dataset,
    read_documents,
    stdlib_source_files,
    train_tokenizer,
    write_token_file,
)
from megascale.data.prepare import validation_mask
from megascale.errors import MegascaleError

REPO = Path(__file__).resolve().parent.parent
TINY_VOCAB = 512  # stdlib code needs ~350 pieces for bytes + specials + characters

TRICKY_TEXTS = [
    "def f(x):\n\tif x:\n\t\treturn 1\n    else:  # mixed indent\n        return 0\n",
    "class A:\n    def __init__(self):\n\n\n        self.n = 1234567890\n   \n",
    "naïve café → ∑ 😀 日本語 \u2581 literal mark\r\nwindows line\r\n",
    "    leading spaces\ttab\x00nul\x7f\n\n\n",
    " ",
    "",
]


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="session")
def stdlib_docs() -> list[str]:
    return list(read_documents(stdlib_source_files(max_bytes=300_000)))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory, stdlib_docs: list[str]) -> Tokenizer:
    path = train_tokenizer(stdlib_docs, tmp_path_factory.mktemp("tok") / "tiny", TINY_VOCAB)
    return Tokenizer(path)


# --- corpus ---------------------------------------------------------------------------


def test_stdlib_source_files_are_library_code_in_stable_order() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_source_files()
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and len(files) > 100
    excluded = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
    assert not any(excluded & set(r.split("/")[:-1]) for r in rel)
    assert all(p.suffix == ".py" and p.stat().st_size <= 200_000 for p in files)
    capped = stdlib_source_files(max_bytes=100_000)
    assert capped == files[: len(capped)]
    assert sum(p.stat().st_size for p in capped[:-1]) < 100_000 <= sum(p.stat().st_size for p in capped)


def test_read_documents_text_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"plain \xff text")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two\\nlines", "id": 2}\n')
    docs = list(read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"]))
    assert docs == ["plain \ufffd text", "one", "two\nlines"]


@pytest.mark.parametrize("line", ["{not json", '{"txt": "x"}', '["text"]'])
def test_read_documents_bad_jsonl_names_file_and_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(MegascaleError) as err:
        list(read_documents([path]))
    assert f"{path}:2" in assert_one_line(err)


# --- tokenizer ------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_tokenizer_round_trips_exactly(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_round_trips_real_source(tokenizer: Tokenizer, stdlib_docs: list[str]) -> None:
    docs = stdlib_docs[:20]
    batch = tokenizer.encode_batch(docs + TRICKY_TEXTS)
    assert batch == [tokenizer.encode(d) for d in docs + TRICKY_TEXTS]
    assert [tokenizer.decode(ids) for ids in batch] == docs + TRICKY_TEXTS
    assert tokenizer.decode(np.array(batch[0], dtype=np.uint16)) == docs[0]


def test_tokenizer_ids_and_digits(tokenizer: Tokenizer) -> None:
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert tokenizer.vocab_size == TINY_VOCAB
    ids = tokenizer.encode("x = 4096")
    assert [tokenizer.decode([i]) for i in ids[-4:]] == ["4", "0", "9", "6"]  # split_digits
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]) == "x = 4096"
    assert pickle.loads(pickle.dumps(tokenizer)).encode("x = 4096") == ids


def test_tokenizer_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(MegascaleError) as err:
        Tokenizer(tmp_path / "nope.model")
    assert "prepare_data.py" in assert_one_line(err)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(MegascaleError) as err:
        Tokenizer(tmp_path / "junk.model")
    assert_one_line(err)


def test_train_tokenizer_impossible_vocab_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(MegascaleError) as err:
        train_tokenizer(["tiny corpus\n"] * 3, tmp_path / "t", 60_000)
    assert "vocab" in assert_one_line(err)
    assert not list(tmp_path.glob("t.model*"))


# --- token files ----------------------------------------------------------------------


def test_token_file_round_trip(tmp_path: Path) -> None:
    docs = [[5, 6, 7], [], [65535, 4], list(range(10, 1000))]
    prefix = write_token_file(tmp_path / "tok", iter(docs), vocab_size=65536, eos_id=3)
    tf = TokenFile(prefix)
    assert (tf.num_documents, tf.num_tokens, tf.vocab_size) == (4, sum(map(len, docs)) + 4, 65536)
    assert tf.dtype == np.uint16
    assert [tf.document(j).tolist() for j in range(4)] == docs
    assert tf.tokens[:9].tolist() == [5, 6, 7, 3, 3, 65535, 4, 3, 10]  # EOS after each document
    seq = 4
    assert tf.num_samples(seq) == (tf.num_tokens - 1) // seq
    assert tf.sample(1, seq).tolist() == tf.tokens[4:9].tolist()
    assert tf.sample(1, seq).dtype == np.int64
    last = tf.num_samples(seq) - 1
    assert len(tf.sample(last, seq)) == seq + 1
    with pytest.raises(IndexError):
        tf.sample(last + 1, seq)
    assert pickle.loads(pickle.dumps(tf)).document(3).tolist() == docs[3]


def test_token_file_uses_uint32_for_big_vocab(tmp_path: Path) -> None:
    write_token_file(tmp_path / "big", [[70_000, 1]], vocab_size=70_001, eos_id=2)
    tf = TokenFile(tmp_path / "big")
    assert tf.dtype == np.uint32 and tf.document(0).tolist() == [70_000, 1]
    assert (tmp_path / "big.bin").stat().st_size == 3 * 4


def test_token_file_empty(tmp_path: Path) -> None:
    tf = TokenFile(write_token_file(tmp_path / "empty", [], vocab_size=10, eos_id=3))
    assert (tf.num_tokens, tf.num_documents, tf.num_samples(8)) == (0, 0, 0)


def test_token_file_rejects_out_of_vocab_ids_and_keeps_old_file(tmp_path: Path) -> None:
    write_token_file(tmp_path / "t", [[1, 2]], vocab_size=10, eos_id=3)
    with pytest.raises(MegascaleError) as err:
        write_token_file(tmp_path / "t", [[1, 2], [10]], vocab_size=10, eos_id=3)
    assert "outside the vocabulary" in assert_one_line(err)
    assert TokenFile(tmp_path / "t").document(0).tolist() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.docs.npy", "t.idx.json"]


def test_token_file_writer_streams_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("megascale.data.tokens.FLUSH_TOKENS", 7)  # force many small writes
    docs = [list(range(i, i + 5)) for i in range(20)]
    with TokenFileWriter(tmp_path / "s", vocab_size=100, eos_id=0) as writer:
        for doc in docs:
            writer.add(doc)
    tf = TokenFile(tmp_path / "s")
    assert [tf.document(j).tolist() for j in range(20)] == docs


def test_token_file_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(MegascaleError) as err:
        TokenFile(tmp_path / "absent")
    assert "prepare_data.py" in assert_one_line(err)

    write_token_file(tmp_path / "t", [list(range(50))], vocab_size=100, eos_id=3)
    with open(tmp_path / "t.bin", "r+b") as f:
        f.truncate(20)
    with pytest.raises(MegascaleError) as err:
        TokenFile(tmp_path / "t")
    assert "truncated" in assert_one_line(err)

    (tmp_path / "t.bin").unlink()
    with pytest.raises(MegascaleError) as err:
        TokenFile(tmp_path / "t")
    assert_one_line(err)

    (tmp_path / "t.idx.json").write_text("{ broken")
    with pytest.raises(MegascaleError) as err:
        TokenFile(tmp_path / "t")
    assert_one_line(err)


# --- sampler --------------------------------------------------------------------------


def run_steps(sampler: DistributedBatchSampler, steps: int) -> list[list[list[int]]]:
    return [[m.tolist() for m in sampler.next_global_batch()] for _ in range(steps)]


def sampler(num=37, gb=8, mb=2, rank=0, dp=1, seed=0, shuffle=True) -> DistributedBatchSampler:
    return DistributedBatchSampler(num, gb, mb, rank, dp, seed, shuffle)


def test_sampler_is_deterministic_and_seeded() -> None:
    assert run_steps(sampler(), 10) == run_steps(sampler(), 10)
    assert run_steps(sampler(), 3) != run_steps(sampler(seed=1), 3)
    assert run_steps(sampler(shuffle=False), 1) == [[[0, 1], [2, 3], [4, 5], [6, 7]]]


def test_sampler_epoch_rollover_drops_tail() -> None:
    s = sampler(num=10, gb=4, mb=4)
    assert s.steps_per_epoch == 2
    epoch0 = [b[0] for b in run_steps(s, 2)]
    assert s.state == SamplerState(epoch=1, consumed=0)
    epoch1 = [b[0] for b in run_steps(s, 2)]
    order0 = np.random.default_rng([0, 0]).permutation(10).tolist()
    assert epoch0 == [order0[:4], order0[4:8]]  # the last 2 samples of epoch 0 are dropped
    assert len(set(sum(epoch1, []))) == 8 and epoch1 != epoch0


def test_sampler_resume_matches_uninterrupted() -> None:
    straight = run_steps(sampler(), 12)
    first = sampler()
    head = run_steps(first, 5)
    saved = json.loads(json.dumps(first.state_dict()))  # it must survive a JSON checkpoint
    resumed = sampler()
    resumed.load_state_dict(saved)
    assert head + run_steps(resumed, 7) == straight


def test_sampler_layouts_see_the_same_global_batch() -> None:
    """1 rank x accum 4, 2 ranks x accum 2, 4 ranks x accum 1: same samples each step."""
    layouts = {dp: [sampler(gb=8, mb=2, rank=r, dp=dp) for r in range(dp)] for dp in (1, 2, 4)}
    assert [layouts[dp][0].grad_accum for dp in (1, 2, 4)] == [4, 2, 1]
    for _ in range(9):  # crosses an epoch boundary (37 // 8 = 4 steps per epoch)
        per_layout = {dp: [s.next_global_batch() for s in ranks] for dp, ranks in layouts.items()}
        unions = []
        for dp, ranks in per_layout.items():
            flat = [int(i) for batches in ranks for b in batches for i in b]
            assert len(flat) == len(set(flat)) == 8  # no overlap between ranks or micro-steps
            unions.append(sorted(flat))
        assert unions[0] == unions[1] == unions[2]
        # Same micro-step m on every layout covers the same slots, in the same order.
        one, two = per_layout[1][0], per_layout[2]
        assert np.concatenate(one[:2]).tolist() == np.concatenate([two[0][0], two[1][0]]).tolist()


def test_sampler_resume_on_a_different_layout() -> None:
    single = sampler(gb=8, mb=4)
    run_steps(single, 3)
    expected = sorted(sum(run_steps(single, 1)[0], []))
    pair = [sampler(gb=8, mb=4, rank=r, dp=2) for r in range(2)]
    state = sampler(gb=8, mb=4)
    run_steps(state, 3)
    for s in pair:
        s.load_state_dict(state.state_dict())
    assert sorted(int(i) for s in pair for i in s.next_global_batch()[0]) == expected


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(gb=10, mb=4), "multiple"),
        (dict(gb=8, mb=2, dp=3), "multiple"),
        (dict(num=5, gb=8, mb=2), "dataset has 5 samples"),
    ],
)
def test_sampler_bad_arithmetic(kwargs: dict, words: str) -> None:
    with pytest.raises(MegascaleError) as err:
        sampler(**kwargs)
    assert words in assert_one_line(err)


def test_sampler_rejects_foreign_state() -> None:
    state = sampler(gb=8).state_dict()
    with pytest.raises(MegascaleError) as err:
        sampler(num=40).load_state_dict(state)
    assert "num_samples" in assert_one_line(err)
    with pytest.raises(MegascaleError):
        sampler(seed=1).load_state_dict(state)


def test_a_resume_with_another_global_batch_goes_on_from_the_same_sample() -> None:
    """Steps of 8, then of 16 from where they stopped: the same stream of samples as steps of 8 all along,
    across the epoch boundary too (each epoch's tail that cannot fill a batch is dropped, as always)."""
    small = sampler(num=64, gb=8, mb=2)
    first = [i for _ in range(3) for m in small.next_global_batch() for i in m.tolist()]
    large = sampler(num=64, gb=16, mb=2)
    large.load_state_dict(small.state_dict())
    then = [i for _ in range(2) for m in large.next_global_batch() for i in m.tolist()]
    reference = sampler(num=64, gb=8, mb=2)
    expected = [i for _ in range(7) for m in reference.next_global_batch() for i in m.tolist()]
    assert first + then == expected[:56]
    # 56 + 16 > 64: the last 8 of epoch 0 cannot fill a batch of 16; the next epoch starts at its first sample.
    assert (large.state.epoch, large.state.consumed) == (1, 0)
    after = [i for m in large.next_global_batch() for i in m.tolist()]
    assert after == reference.epoch_order(1)[:16].tolist() and (large.state.epoch, large.state.consumed) == (1, 16)


def test_batch_from_indices_shifts_targets(tmp_path: Path) -> None:
    write_token_file(tmp_path / "t", [list(range(4, 60))], vocab_size=64, eos_id=3)
    tf = TokenFile(tmp_path / "t")
    inputs, targets = batch_from_indices(tf, np.array([2, 0]), seq_len=5)
    assert inputs.shape == targets.shape == (2, 5) and inputs.dtype == torch.long
    assert inputs[1].tolist() == [4, 5, 6, 7, 8] and targets[1].tolist() == [5, 6, 7, 8, 9]
    assert inputs[0].tolist() == list(range(14, 19))


# --- preparation ----------------------------------------------------------------------


def synthetic_docs(n: int = 400) -> list[str]:
    """Python-like documents with a small alphabet, so a 300-piece vocabulary fits."""
    return [
        f"def f{i}(x, y):\n    if x > {i * 7}:\n\treturn x + y * {i}\n    return y - {i % 13}\n" * (1 + i % 5)
        for i in range(n)
    ]


def test_prepare_dataset_writes_splits_and_manifest(tmp_path: Path) -> None:
    docs = synthetic_docs()
    out = prepare_dataset(docs, tmp_path / "d", vocab_size=300, val_fraction=0.05, seed=3)
    manifest = load_manifest(out)
    assert manifest["tokenizer"] == "tokenizer.model" and manifest["vocab_size"] == 300
    tok = Tokenizer(out / manifest["tokenizer"])
    is_val = validation_mask(len(docs), 0.05, 3)
    for name, want in (("train", ~is_val), ("val", is_val)):
        tf = TokenFile(out / name)
        expected = [d for d, keep in zip(docs, want) if keep]
        assert manifest["splits"][name]["documents"] == tf.num_documents == len(expected) > 0
        assert manifest["splits"][name]["tokens"] == tf.num_tokens
        assert [tok.decode(tf.document(j)) for j in range(tf.num_documents)] == expected
    assert 5 <= is_val.sum() <= 40


def test_prepare_dataset_is_deterministic_and_reuses_a_tokenizer(tmp_path: Path) -> None:
    docs = synthetic_docs(100)
    a = prepare_dataset(lambda: iter(docs), tmp_path / "a", vocab_size=300)
    b = prepare_dataset(docs, tmp_path / "b", vocab_size=300, tokenizer_path=a / "tokenizer.model")
    for name in ("train.bin", "val.bin", "train.docs.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    with pytest.raises(MegascaleError) as err:
        prepare_dataset(docs, tmp_path / "c", vocab_size=400, tokenizer_path=a / "tokenizer.model")
    assert "--vocab-size 300" in assert_one_line(err)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_validation_mask_always_has_both_splits() -> None:
    for n, frac in ((2, 0.0), (3, 0.0), (50, 0.9), (1000, 0.02)):
        mask = validation_mask(n, frac, seed=0)
        assert mask.any() and not mask.all()
    with pytest.raises(MegascaleError):
        validation_mask(1, 0.1, seed=0)


def test_load_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(MegascaleError) as err:
        load_manifest(tmp_path / "missing")
    assert "prepare_data.py" in assert_one_line(err)
    with pytest.raises(MegascaleError) as err:
        load_manifest(tmp_path)
    assert "prepare_data.py" in assert_one_line(err)
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(MegascaleError) as err:
        load_manifest(tmp_path)
    assert_one_line(err)


ENSURE_SCRIPT = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO)
from megascale.data import ensure_stdlib_dataset
ensure_stdlib_dataset(Path(sys.argv[1]), 512, 200_000)
"""


def test_ensure_stdlib_dataset_concurrent_ranks_build_once(tmp_path: Path) -> None:
    out = tmp_path / "stdlib"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ranks = [
        subprocess.Popen([sys.executable, "-c", ENSURE_SCRIPT, str(out)], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=120)[1] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], logs
    assert sum("building the stdlib corpus" in log for log in logs) == 1
    manifest = load_manifest(out)
    assert manifest["sources"]["kind"] == "stdlib" and manifest["vocab_size"] == 512
    stamp = (out / "train.bin").stat().st_mtime_ns
    ensure_stdlib_dataset(out, 512, 200_000)  # already there: nothing rebuilt
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    # Another vocabulary or size: one line, and the corpus (whose tokenizer checkpoints name) is left as it was.
    tokenizer = (out / "tokenizer.model").read_bytes()
    for vocab, max_bytes, changed in [(384, 200_000, "model.vocab_size=512, not model.vocab_size=384"),
                                      (512, 100_000, "data.stdlib_max_bytes=200000, not data.stdlib_max_bytes=100000")]:
        with pytest.raises(MegascaleError) as err:
            ensure_stdlib_dataset(out, vocab, max_bytes)
        line = assert_one_line(err)
        assert f"built with {changed}; it is not rebuilt in place" in line and "set data.path to a new directory" in line
    assert (out / "tokenizer.model").read_bytes() == tokenizer and (out / "train.bin").stat().st_mtime_ns == stamp


def test_ensure_stdlib_dataset_never_overwrites_other_data(tmp_path: Path) -> None:
    prepare_dataset(synthetic_docs(20), tmp_path, vocab_size=300)
    with pytest.raises(MegascaleError) as err:
        ensure_stdlib_dataset(tmp_path, 300, 100_000)
    assert "not the embedded stdlib" in assert_one_line(err)


# --- launcher -------------------------------------------------------------------------


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "prepare_data.py"), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )


def test_cli_prepares_a_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / ".hidden").mkdir()
    for i, text in enumerate(synthetic_docs(30)):
        (src / "sub" / f"f{i}.py").write_text(text)
    (src / "notes.md").write_text("# notes\n\nsome text 123\n")
    (src / "more.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in synthetic_docs(5)))
    (src / ".hidden" / "skip.txt").write_text("hidden")
    (src / "ignored.bin").write_bytes(b"\x00\x01")
    result = run_cli("--out", tmp_path / "out", "--vocab-size", 300, src, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "tokenizer.model" in result.stdout
    manifest = load_manifest(tmp_path / "out")
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 30 + 1 + 5


@pytest.mark.parametrize("vocab, what, fragment", [(300, "nope", "nope"), (0, "docs", "--vocab-size 0 must be positive")])
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, vocab: int, what: str, fragment: str) -> None:
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i}\n")
    result = run_cli("--out", tmp_path / "out", "--vocab-size", vocab, tmp_path / what, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and fragment in result.stderr
    assert not (tmp_path / "out").exists()  # refused before anything is written
