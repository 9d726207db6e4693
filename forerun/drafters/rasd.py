"""RASD: retrieval-augmented speculative decoding (Quan et al. 2025).

A draft model proposes its tree (forerun.drafters.draft_model, run as is); the datastore proposes
REST's retrieval trie. The retrieval trie is pruned by the draft model's own probabilities: one
draft-model forward over the trie scores each node by its cumulative draft probability, and the
`retrieved_nodes` best survive. The survivors are fused into the model tree by longest-prefix
matching: a retrieved node whose prefix the model tree already holds reuses that node, the rest hang
below the deepest match.

Exactness at temperature > 0: the model's nodes keep the q rows they were drawn from; retrieved
nodes are deterministic (a one-hot q row) and come after the model's siblings, so recursive
rejection sampling meets them only with the residual left by the model's draws; a deterministic
candidate chosen from anything already drawn is accepted with the residual's probability, which
keeps the output exact.
"""
from __future__ import annotations

import dataclasses

import torch

from forerun.drafters.base import Drafter, Sequence, room
from forerun.drafters.draft_model import DraftCache, DraftModel
from forerun.drafters.registry import register
from forerun.drafters.retrieval import RETRIEVAL_OPTIONS, RetrievalOptions, checked_datastore, retrieve
from forerun.drafters.tries import prune
from forerun.models.batch import ForwardBatch
from forerun.sampling import target_probs
from forerun.tree import Tree
from forerun.types import Draft


@register("rasd")
class RetrievalAugmented(Drafter):
    drafts_with_model = True

    def __init__(self, target, spec, draft=None):
        super().__init__(target, spec)
        ours = tuple((k, v) for k, v in spec.options if k in RETRIEVAL_OPTIONS)
        theirs = tuple((k, v) for k, v in spec.options if k not in RETRIEVAL_OPTIONS)
        self.opts = RetrievalOptions.from_spec(dataclasses.replace(spec, options=ours), "rasd")
        self.store = checked_datastore(target, self.opts)
        if not spec.draft_model and draft is None:
            raise ValueError("method 'rasd' needs a draft model (--draft-model PATH) and a datastore")
        self.model = DraftModel(target, dataclasses.replace(spec, method="draft", options=theirs), draft=draft)

    def begin(self, seq: Sequence) -> DraftCache:
        return self.model.begin(seq)

    def propose(self, seq: Sequence, depth: int) -> Draft:
        drafted = self.model.propose(seq, depth)
        trie = retrieve(self.store, seq, self.opts)
        keep = min(self.opts.retrieved_nodes, room(seq) - drafted.size - 1)
        if len(trie.tokens) == 1 or keep < 1:
            return drafted
        candidates = trie.pruned(min(2 * keep, room(seq) - drafted.size - 1))  # frequency first: bounds the forward
        retrieved = prune(candidates, keep, self._draft_scores(seq, candidates, drafted.size))
        return fuse(drafted, retrieved, seq.params.greedy)

    @torch.inference_mode()
    def _draft_scores(self, seq: Sequence, trie: Tree, model_nodes: int) -> list[float]:
        """Each trie node's cumulative draft-model probability, from one draft forward over the trie
        (its root again first, for the root's distribution). It runs at cache slots past the model
        tree's, which the draft model never reuses."""
        rt, params = self.model.draft, seq.params
        base, parents = len(seq.tokens) - 1, trie.parents
        n, tokens = len(parents), trie.tokens.tolist()
        mask = torch.cat([torch.zeros(n, model_nodes, dtype=torch.bool), trie.mask], dim=1)
        # Column 0 is the model tree's root, whose K/V the draft model wrote at slot `base`; every trie
        # node sees the root there, not the root copy's own entry (which would count it twice).
        mask[:, 0], mask[:, model_nodes] = True, False
        batch = ForwardBatch.contiguous(trie.tokens, torch.tensor(trie.depths) + base, base + model_nodes, mask)
        logits = rt.model(batch, seq.draft_state.cache).logits.cpu()
        probs = torch.softmax(logits, -1) if params.greedy else target_probs(logits, params)
        score = [1.0] * n
        for i in range(1, n):
            score[i] = score[parents[i]] * float(probs[parents[i], tokens[i]])
        return score


def fuse(drafted: Draft, retrieved: Tree, greedy: bool) -> Draft:
    """The model's draft with the retrieved tree merged in by longest-prefix matching."""
    tokens, parents = drafted.tree.tokens.tolist(), list(drafted.tree.parents)
    child = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens)) if p >= 0}
    where = [0]  # retrieved node -> fused node
    for t, p in zip(retrieved.tokens.tolist()[1:], retrieved.parents[1:]):
        key = (where[p], t)
        if key not in child:
            child[key] = len(tokens)
            tokens.append(t), parents.append(where[p])
        where.append(child[key])
    q = None
    if not greedy:
        added = torch.nn.functional.one_hot(torch.tensor(tokens[drafted.size:]), drafted.q.shape[1]).to(drafted.q.dtype)
        q = torch.cat([drafted.q, added])
    return Draft(Tree(tokens=torch.tensor(tokens), parents=parents), q=q)
