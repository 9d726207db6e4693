"""A REST-style datastore: the corpus's token ids, concatenated, and their suffix array.

Documents are joined with a separator (-1) that no query contains, so no match or continuation
crosses a document boundary. Finding every occurrence of an n-gram is two binary searches over the
suffix array (O(n log T)); its continuations are the tokens after each occurrence. The directory
holds tokens.npy, suffixes.npy and meta.json; meta records the tokenizer's fingerprint, because the
ids mean nothing under another vocabulary.
"""
from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEPARATOR = -1
FORMAT = 1


@dataclass(frozen=True)
class Datastore:
    tokens: np.ndarray  # [T] int32: documents' token ids, each followed by SEPARATOR
    suffixes: np.ndarray  # [T] int32/int64: start offsets of the suffixes in lexicographic order
    fingerprint: str  # the tokenizer's (see fingerprint_of)
    meta: dict

    def occurrences(self, query: list[int]) -> tuple[int, int]:
        """[lo, hi): the suffix-array rows whose suffix starts with `query`."""
        n, tokens, sa = len(query), self.tokens, self.suffixes
        rows = range(len(sa))

        def key(row: int) -> list[int]:
            return tokens[sa[row]:sa[row] + n].tolist()
        return bisect_left(rows, query, key=key), bisect_right(rows, query, key=key)

    def longest_match(self, context: list[int], n_max: int, n_min: int) -> tuple[int, int, int]:
        """(n, lo, hi) for the longest suffix of `context` (n_max down to n_min tokens) that occurs
        in the corpus; n = 0 when none does."""
        for n in range(min(n_max, len(context)), n_min - 1, -1):
            lo, hi = self.occurrences(context[-n:])
            if hi > lo:
                return n, lo, hi
        return 0, 0, 0

    def continuations(self, context: list[int], n_max: int, n_min: int, count: int,
                      length: int) -> list[list[int]]:
        """Up to `count` continuations (each up to `length` tokens) of the longest matched suffix,
        taken evenly across the occurrences: the suffix array sorts them by what follows, so the
        first `count` rows would favour one end of the alphabet."""
        n, lo, hi = self.longest_match(context, n_max, n_min)
        if n == 0:
            return []
        rows = np.unique(np.linspace(lo, hi - 1, num=min(count, hi - lo)).round().astype(np.int64))
        out = []
        for start in self.suffixes[rows] + n:
            cont = self.tokens[start:start + length]
            stop = np.flatnonzero(cont == SEPARATOR)
            cont = cont[:stop[0]] if stop.size else cont
            if cont.size:
                out.append(cont.tolist())
        return out

    def check(self, fingerprint: str, model: str) -> None:
        if fingerprint != self.fingerprint:
            raise ValueError(
                f"datastore {self.meta.get('path', '?')!r} was built with tokenizer {self.fingerprint} "
                f"({self.meta.get('model', '?')}), but {model} has tokenizer {fingerprint}: "
                "rebuild it with `forerun datastore build ... --model` for this model")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "tokens.npy", self.tokens)
        np.save(path / "suffixes.npy", self.suffixes)
        meta = {**self.meta, "format": FORMAT, "fingerprint": self.fingerprint, "tokens": int(self.tokens.size)}
        meta.pop("path", None)
        (path / "meta.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Datastore:
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"no datastore at {str(path)!r} (expected meta.json there); "
                                    "build one with `forerun datastore build FILES... --out DIR`")
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"datastore {str(path)!r} has format {meta.get('format')}; this forerun reads {FORMAT}")
        return cls(np.load(path / "tokens.npy"), np.load(path / "suffixes.npy"), meta["fingerprint"],
                   {**meta, "path": str(path)})


def build(documents: Iterable[list[int]], fingerprint: str, **meta) -> Datastore:
    """A datastore over token-id documents."""
    parts = [np.append(np.asarray(doc, dtype=np.int32), np.int32(SEPARATOR)) for doc in documents if doc]
    if not parts:
        raise ValueError("the corpus is empty: no document has any tokens")
    tokens = np.concatenate(parts)
    dtype = np.int32 if tokens.size < 2**31 else np.int64
    return Datastore(tokens, suffix_array(tokens).astype(dtype), fingerprint,
                     {**meta, "documents": len(parts)})


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """[T] start offsets of all suffixes in lexicographic order (a suffix that ends sorts before its
    extensions). Prefix doubling: sort by (rank of the first k tokens, rank of the next k) until
    every rank is distinct; O(T log^2 T) in numpy, a few seconds for millions of tokens."""
    n = tokens.size
    rank = np.unique(tokens, return_inverse=True)[1].astype(np.int64).reshape(-1)
    order = np.argsort(rank, kind="stable")
    k = 1
    while True:
        second = np.full(n, -1, dtype=np.int64)
        second[:n - k] = rank[k:] if k < n else second[:0]
        order = np.lexsort((second, rank))
        first_sorted, second_sorted = rank[order], second[order]
        changed = np.ones(n, dtype=bool)
        changed[1:] = (first_sorted[1:] != first_sorted[:-1]) | (second_sorted[1:] != second_sorted[:-1])
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.cumsum(changed) - 1
        if rank[order[-1]] == n - 1 or k >= n:
            return order
        k *= 2


def fingerprint_of(runtime) -> str:
    """The token-id space a datastore must share with the model: its tokenizer's vocabulary, or for a
    model loaded without a tokenizer (token ids only) its vocabulary size."""
    if runtime.tokenizer is None:
        return f"ids-only-vocab-{runtime.model.args.vocab_size}"
    return runtime.tokenizer.fingerprint()


def read_documents(files: Iterable[str | Path]) -> Iterator[str]:
    """Texts of a corpus: a .jsonl file gives one document per line (its "text" field, else every
    string in the record joined by newlines); any other file is one document."""
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {str(path)!r} does not exist")
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as lines:
                for number, line in enumerate(lines, 1):
                    if line.strip():
                        yield _record_text(json.loads(line), path, number)
        else:
            yield path.read_text(encoding="utf-8")


def _record_text(record, path: Path, number: int) -> str:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    strings = list(_strings(record))
    if not strings:
        raise ValueError(f"{path}:{number}: no text in this JSON record")
    return "\n".join(strings)


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
