"""REST: retrieval-based speculative decoding (He et al. 2024).

Find the longest suffix of the context (n_max down to n_min tokens) in a datastore's suffix array,
take up to `matches` of its continuations, merge them into a trie that counts how many continuations
pass through each node, and keep the `retrieved_nodes` most frequent nodes as the draft tree. Every
node is a deterministic choice (q = None), so verification is exact at any temperature. Costs no model
forward; wins where the output reuses phrasing from the corpus (code, docs, templated answers), and
drafts nothing when the context's suffix is not in it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

from forerun.drafters.base import Drafter, Sequence, room, root_only
from forerun.drafters.registry import register
from forerun.drafters.tries import Trie
from forerun.retrieval.datastore import Datastore, fingerprint_of
from forerun.types import Draft


@dataclass(frozen=True, slots=True)
class RetrievalOptions:
    datastore: str | None = None  # directory written by `forerun datastore build`
    retrieved_nodes: int = 24  # draft tree nodes besides the root
    depth: int = 8  # tokens per continuation (tree depth)
    matches: int = 128  # continuations read per lookup
    n_max: int = 12  # longest context suffix to look up
    n_min: int = 2

    @classmethod
    def from_spec(cls, spec, method: str) -> RetrievalOptions:
        values = spec.option_values({f.name: f.default for f in fields(cls)})
        if not values["datastore"]:
            raise ValueError(f"method {method!r} needs a datastore: --opt datastore=DIR "
                             "(build one with `forerun datastore build FILES... --out DIR`)")
        opts = cls(**values)
        if min(opts.retrieved_nodes, opts.depth, opts.matches, opts.n_min) < 1 or opts.n_min > opts.n_max:
            raise ValueError("retrieval options need retrieved_nodes, depth, matches >= 1 and 1 <= n_min <= n_max")
        return opts


RETRIEVAL_OPTIONS = tuple(f.name for f in fields(RetrievalOptions))


@lru_cache(maxsize=4)
def open_datastore(path: str) -> Datastore:
    """Loaded once per process: drafters for several configs may share one datastore."""
    return Datastore.load(path)


def checked_datastore(target, opts: RetrievalOptions) -> Datastore:
    store = open_datastore(str(opts.datastore))
    store.check(fingerprint_of(target), repr(target.name))
    return store


def retrieve(store: Datastore, seq: Sequence, opts: RetrievalOptions) -> Trie:
    """The trie of the continuations of the context's longest suffix found in the store."""
    trie = Trie(seq.root)
    for branch in store.continuations(seq.tokens, opts.n_max, opts.n_min, opts.matches, opts.depth):
        trie.add(branch)
    return trie


@register("retrieval")
class Retrieval(Drafter):
    def __init__(self, target, spec):
        super().__init__(target, spec)
        self.opts = RetrievalOptions.from_spec(spec, "retrieval")
        self.store = checked_datastore(target, self.opts)

    def propose(self, seq: Sequence, depth: int) -> Draft:
        trie = retrieve(self.store, seq, self.opts)
        if len(trie.tokens) == 1:
            return root_only(seq)
        return Draft(trie.pruned(min(self.opts.retrieved_nodes, room(seq) - 1)))
