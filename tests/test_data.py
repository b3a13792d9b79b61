"""dsv3.data: tokenizer, default corpus, fixed validation split, deterministic batches."""

import numpy as np
import pytest

from dsv3.data import BatchSampler, ByteTokenizer, eval_batches, iterate, load_corpus


def test_tokenizer_round_trip_utf8():
    text = "def f(x):\n    return x  # naïve — ok ✓"
    ids = ByteTokenizer.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert ByteTokenizer.decode(ids) == text
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        ByteTokenizer.decode([65, 256])


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_default_corpus_is_stdlib_and_split(corpus):
    assert corpus.source == "python-stdlib"
    assert corpus.n_files > 50 and corpus.n_bytes > 1_000_000
    # about 1/20 held out, disjoint blocks
    assert 0.03 < corpus.val.size / corpus.n_bytes < 0.08
    h = corpus.unigram_entropy()
    assert 2.5 < h < 4.0  # code: roughly 4.5 bits/byte
    again = load_corpus()
    assert again.fingerprint == corpus.fingerprint
    assert np.array_equal(again.val, corpus.val)


def test_user_file_and_folder(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(2000))
    (tmp_path / "a.txt").write_text(text)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text(text.upper())
    (sub / "blob.bin").write_bytes(b"\x00\x01binary")
    one = load_corpus(str(tmp_path / "a.txt"), block_bytes=1024)
    assert one.n_files == 1 and one.n_bytes == len(text.encode())
    both = load_corpus(str(tmp_path), block_bytes=1024)
    assert both.n_files == 2  # binary skipped
    assert both.n_bytes == 2 * len(text.encode()) + 1  # joined by one newline
    assert both.val.size > 0 and both.train.size > both.val.size
    with pytest.raises(FileNotFoundError):
        load_corpus(str(tmp_path / "missing"))
    (tmp_path / "small.txt").write_text("tiny")
    with pytest.raises(ValueError, match="too small"):
        load_corpus(str(tmp_path / "small.txt"))


def test_batches_shifted_labels_and_deterministic():
    tokens = (np.arange(5000) % 251).astype(np.uint8)
    s = BatchSampler(tokens, seq_len=16, seed=3)
    x, y = s.batch(0, 8)
    assert x.shape == y.shape == (8, 16) and x.dtype == np.int32
    assert np.array_equal(x[:, 1:], y[:, :-1])  # labels[i] = t_{i+1}
    # each window is a contiguous slice of the corpus
    for row_x, row_y in zip(x, y):
        w = np.concatenate([row_x, row_y[-1:]])
        assert any(np.array_equal(tokens[k:k + 17], w) for k in np.flatnonzero(tokens[:-16] == row_x[0]))
    # pure function of (seed, sample index)
    s2 = BatchSampler(tokens, seq_len=16, seed=3)
    assert np.array_equal(s2.batch(5, 3)[0], np.concatenate([s.batch(5, 1)[0], s.batch(6, 1)[0], s.batch(7, 1)[0]]))
    assert not np.array_equal(BatchSampler(tokens, 16, seed=4).batch(0, 8)[0], x)
    it = iterate(s, 4, start_sample=4)
    assert np.array_equal(next(it)[0], s.batch(4, 4)[0])


def test_epochs_cover_every_window_once():
    tokens = np.frombuffer(np.arange(1000, dtype=np.uint16).tobytes(), dtype=np.uint8)[:1000]
    s = BatchSampler(tokens, seq_len=10, seed=0)
    n0 = (tokens.size - 1) // 10
    starts = sorted(int(s._epoch(0)[1][j]) for j in range(n0))
    assert starts == list(range(n0))
    # epoch 1 begins right after epoch 0, with a new order
    assert s.epoch_of(n0 - 1) == 0 and s.epoch_of(n0) == 1
    # Tokens equal to their positions: a window's first token is where it starts.
    s = BatchSampler(np.arange(1000, dtype=np.int32), seq_len=10, seed=0)
    n1 = next(i for i in range(n0, 3 * n0) if s.epoch_of(i) == 2) - n0
    for i in range(2 * n0):
        w = s.window(i)
        assert np.array_equal(w, np.arange(w[0], w[0] + 11)), i  # seq_len + 1 consecutive tokens
    a = [int(s.window(i)[0]) for i in range(n0)]
    b = [int(s.window(i)[0]) for i in range(n0, n0 + n1)]
    assert sorted(a) == list(range(0, 10 * n0, 10))  # epoch 0: every window at offset 0, once
    o1 = b[0] % 10
    assert n1 == (1000 - o1 - 1) // 10 == n0  # 99 windows at any offset in [0, 10)
    assert sorted(b) == list(range(o1, o1 + 10 * n1, 10))  # epoch 1: every window at its offset, once
    assert [x - o1 for x in b] != a  # in a new order (same length: a real comparison)


def test_eval_batches_fixed():
    tokens = (np.arange(3000) % 200).astype(np.uint8)
    v1 = eval_batches(tokens, 32, 4, 3)
    v2 = eval_batches(tokens, 32, 4, 3)
    assert len(v1) == 3
    for (x1, y1), (x2, y2) in zip(v1, v2):
        assert np.array_equal(x1, x2) and np.array_equal(x1[:, 1:], y1[:, :-1])
