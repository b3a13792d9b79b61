"""Training data with no download: a byte-level tokenizer, a default corpus and batches.

Tokens are the bytes of UTF-8 text (vocabulary 256, the ``small`` preset's).
The default corpus is text every machine with Python already holds: the
top-level ``.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), in sorted order, about 4-5 MB. It is
deterministic for a given Python version; ``Corpus.fingerprint`` records
exactly which bytes were used. ``--data PATH`` replaces it with a user's text
file, or every text file under a folder (sorted, binary files skipped).

The validation split is fixed (independent of the seed): the corpus is cut into
blocks of ``block_bytes`` and every ``val_every``-th block is held out. The
train split is sampled as windows of ``seq_len + 1`` bytes at stride
``seq_len``; each epoch visits every window once in an order drawn from
``numpy.random.default_rng([seed, epoch])``, with an epoch-dependent start
offset, so a batch is a pure function of (seed, sample index). Resuming needs
only the number of samples consumed.

A batch is ``(input_ids [B, T] int32, labels [B, T] int32)`` with
``labels[b, i] = input_ids[b, i + 1]`` of the same window (``t_{i+1}``).
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

VOCAB_SIZE = 256


# ------------------------------------------------------------------ tokenizer
class ByteTokenizer:
    """UTF-8 bytes <-> token ids 0..255. Decoding replaces invalid sequences."""

    vocab_size = VOCAB_SIZE

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    @staticmethod
    def decode(ids: Sequence[int]) -> str:
        bad = [int(i) for i in ids if not 0 <= int(i) < VOCAB_SIZE]
        if bad:
            raise ValueError(f"token ids outside the byte vocabulary [0, 256): {bad[:10]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# --------------------------------------------------------------------- corpus
def default_corpus_files() -> list[str]:
    """The default corpus: the standard library's top-level .py files, sorted by name."""
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))
    files = [os.path.join(stdlib, n) for n in names if os.path.isfile(os.path.join(stdlib, n))]
    if not files:
        raise FileNotFoundError(f"no .py files found in the standard library at {stdlib!r}; pass --data PATH")
    return files


def _is_text(raw: bytes) -> bool:
    return b"\x00" not in raw[:8192]


def _files_under(path: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith("."))
    return out


@dataclass
class Corpus:
    """A byte corpus split into fixed train and validation arrays (uint8)."""

    train: np.ndarray
    val: np.ndarray
    source: str  # human-readable description
    n_files: int
    fingerprint: str  # sha256 of all bytes, in order (first 16 hex digits)

    @property
    def n_bytes(self) -> int:
        return int(self.train.size + self.val.size)

    def unigram_entropy(self) -> float:
        """Entropy of the train split's byte distribution, nats per byte."""
        counts = np.bincount(self.train, minlength=VOCAB_SIZE).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def load_corpus(path: Optional[str] = None, *, val_every: int = 20, block_bytes: int = 8192,
                max_bytes: Optional[int] = None) -> Corpus:
    """Read the default corpus (path None) or a text file / folder of text files.

    Documents are joined with a blank line. Of the blocks of ``block_bytes``
    bytes, those with index ``val_every // 2 (mod val_every)`` go to validation
    (the last block when the corpus is shorter). ``max_bytes`` truncates (tests).
    """
    if path is None:
        files, source = default_corpus_files(), "python-stdlib"
    elif os.path.isdir(path):
        files, source = _files_under(path), os.path.abspath(path)
    elif os.path.isfile(path):
        files, source = [path], os.path.abspath(path)
    else:
        raise FileNotFoundError(f"--data {path!r}: no such file or directory")
    chunks: list[bytes] = []
    for fn in files:
        with open(fn, "rb") as f:
            raw = f.read()
        if raw and _is_text(raw):
            chunks.append(raw if raw.endswith(b"\n") else raw + b"\n")
    if not chunks:
        raise ValueError(f"no text found in {source!r} (binary files are skipped)")
    data = b"\n".join(chunks)
    if max_bytes is not None:
        data = data[:max_bytes]
    arr = np.frombuffer(data, dtype=np.uint8)
    n_blocks = math.ceil(arr.size / block_bytes)
    if val_every < 2 or n_blocks < 2:
        raise ValueError(f"corpus {source!r} has {arr.size} bytes: too small to hold out a validation split "
                         f"(need at least {2 * block_bytes} bytes)")
    blocks = np.arange(n_blocks)
    is_val = (blocks % val_every) == val_every // 2
    if not is_val.any():
        is_val[-1] = True
    pieces = np.split(arr, np.arange(1, n_blocks) * block_bytes)
    train = np.concatenate([p for p, v in zip(pieces, is_val) if not v])
    val = np.concatenate([p for p, v in zip(pieces, is_val) if v])
    fp = hashlib.sha256(data).hexdigest()[:16]
    return Corpus(train=train, val=val, source=source, n_files=len(chunks), fingerprint=fp)


# -------------------------------------------------------------------- batches
class BatchSampler:
    """Deterministic training windows: sample ``i`` is a pure function of (seed, i).

    Epoch e starts at offset ``o_e`` (drawn in [0, seq_len)) and visits the
    ``n_e`` windows ``tokens[o_e + j*T : o_e + j*T + T + 1]`` in the order
    ``default_rng([seed, e]).permutation(n_e)``.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive (got {seq_len})")
        if tokens.size < 2 * (seq_len + 1):
            raise ValueError(f"the training split has {tokens.size} tokens: too few for windows of "
                             f"seq_len={seq_len} (need at least {2 * (seq_len + 1)})")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self._epoch_cache: dict[int, tuple[int, np.ndarray]] = {}
        # Epoch sizes depend only on the offset; cumulative starts are computed lazily.
        self._starts = [0]

    def _epoch(self, e: int) -> tuple[int, np.ndarray]:
        if e not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, e])
            offset = int(rng.integers(0, self.seq_len)) if e > 0 else 0
            n = (self.tokens.size - offset - 1) // self.seq_len
            if len(self._epoch_cache) > 4:
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[e] = (offset, rng.permutation(n))
        return self._epoch_cache[e]

    def _locate(self, i: int) -> tuple[int, int]:
        while self._starts[-1] <= i:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self._epoch(e)[1]))
        e = int(np.searchsorted(self._starts, i, side="right")) - 1
        return e, i - self._starts[e]

    def window(self, i: int) -> np.ndarray:
        """Sample i: seq_len + 1 consecutive tokens."""
        e, j = self._locate(i)
        offset, perm = self._epoch(e)
        start = offset + int(perm[j]) * self.seq_len
        return self.tokens[start: start + self.seq_len + 1]

    def batch(self, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples start .. start+size-1 as (input_ids, labels), both int32 [size, T]."""
        w = np.stack([self.window(i) for i in range(start, start + size)]).astype(np.int32)
        return w[:, :-1].copy(), w[:, 1:].copy()

    def epoch_of(self, i: int) -> int:
        return self._locate(i)[0]


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed validation set: up to n_batches * batch_size windows evenly spaced over ``tokens``."""
    n_windows = (tokens.size - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"the validation split has {tokens.size} tokens: too few for seq_len={seq_len}")
    want = min(n_batches * batch_size, n_windows)
    idx = np.linspace(0, n_windows - 1, want).round().astype(np.int64)
    idx = np.unique(idx)
    w = np.stack([tokens[k * seq_len: k * seq_len + seq_len + 1] for k in idx]).astype(np.int32)
    out = []
    for s in range(0, len(w) - batch_size + 1, batch_size):
        out.append((w[s:s + batch_size, :-1].copy(), w[s:s + batch_size, 1:].copy()))
    if not out:  # fewer windows than one batch: one smaller batch
        out.append((w[:, :-1].copy(), w[:, 1:].copy()))
    return out


def iterate(sampler: BatchSampler, batch_size: int, start_sample: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    i = start_sample
    while True:
        yield sampler.batch(i, batch_size)
        i += batch_size
