"""A separate, smaller draft model with the target's tokenizer, drafting a chain or a tree.

The tree grows level by level: every node of the newest level is run through the draft model in one
forward, and the `tree_width` most probable of them (by cumulative draft probability) each get
`tree_width` children (top-k when greedy; Gumbel-top-k, i.e. sampling without replacement, when
sampling, which recursive rejection sampling verifies exactly). With tree_width 1 this is a chain.
The draft model keeps its own KV cache; entries that match the committed sequence are reused.
"""
from __future__ import annotations

import torch

from forerun.drafters.base import Drafter, Sequence
from forerun.drafters.registry import register
from forerun.sampling import gumbel_top_k, target_probs
from forerun.tree import depths, tree_mask
from forerun.types import Draft


@register("draft")
class DraftModel(Drafter):
    def __init__(self, target, spec, draft=None):
        super().__init__(target, spec)
        if draft is None:
            if not spec.draft_model:
                raise ValueError("method 'draft' needs a draft model (--draft-model PATH)")
            from forerun.models.runtime import load
            draft = load(spec.draft_model, dtype=str(target.model.dtype).removeprefix("torch."),
                         device=str(target.device))
        _check_tokenizers(target, draft)
        self.draft = draft
        self.cache = None
        self.cached_tokens: list[int] = []  # tokens whose K/V sit in self.cache, slot by slot

    def begin(self, seq: Sequence) -> None:
        self.cache = self.draft.model.new_cache(seq.cache.max_len)
        self.cached_tokens = []

    def propose(self, seq: Sequence, budget: int) -> Draft:
        model, device = self.draft.model, self.draft.device
        width, params, base = self.spec.tree_width, seq.params, len(seq.tokens) - 1
        reuse = _common_prefix(self.cached_tokens, seq.tokens[:-1])
        pending = seq.tokens[reuse:]  # uncached context, then the root
        hidden = model(torch.tensor(pending, device=device), torch.arange(reuse, base + 1, device=device),
                       self.cache, reuse, logits=False)[-1:]
        tokens, parents, q_rows, score = [seq.root], [-1], [None], [0.0]
        level = [0]  # the nodes whose logits `hidden` holds
        for depth in range(budget):
            logits = model.head(hidden).float().cpu()  # [len(level), V]
            expand = sorted(range(len(level)), key=lambda j: -score[level[j]])[:width]
            new_level = []
            for j in expand:
                for token, q, logp in _children(logits[j], width, params, seq.generator):
                    new_level.append(len(tokens))
                    tokens.append(token), parents.append(level[j]), q_rows.append(q)
                    score.append(score[level[j]] + logp)
            if depth == budget - 1:
                break
            lo, hi = new_level[0], new_level[-1] + 1
            mask = tree_mask(parents)[lo:hi, :hi]
            positions = torch.tensor(depths(parents)[lo:hi], device=device) + base
            hidden = model(torch.tensor(tokens[lo:hi], device=device), positions, self.cache, base + lo,
                           tree_mask=mask.to(device), logits=False)
            level = new_level
        # Slots base.. hold tree nodes by index; the chain prefix of the tree is a valid sequence.
        chain_len = next((i for i, p in enumerate(parents) if p != i - 1), len(parents))
        written = min(chain_len, len(tokens) - len(new_level))
        self.cached_tokens = seq.tokens[:-1] + tokens[:written]
        q = None if params.greedy else torch.stack([torch.zeros_like(q_rows[1]) if r is None else r
                                                    for r in q_rows])
        return Draft(tokens=torch.tensor(tokens), parents=parents, q=q)


def _children(logits: torch.Tensor, width: int, params, generator):
    """(token, proposal distribution or None, log-probability) for each child of one node."""
    probs = torch.softmax(logits, dim=-1) if params.greedy else target_probs(logits, params)
    if params.greedy:
        top = torch.topk(probs, width)
        return [(int(t), None, float(p.log())) for t, p in zip(top.indices, top.values)]
    out, remaining = [], probs.clone()
    for t in gumbel_top_k(probs, width, generator):
        q = remaining / remaining.sum()  # sibling j was drawn from q without the earlier siblings
        out.append((t, q, float(probs[t].log())))
        remaining[t] = 0.0
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _check_tokenizers(target, draft) -> None:
    if target.tokenizer is None or draft.tokenizer is None:
        if target.model.args.vocab_size != draft.model.args.vocab_size:
            raise ValueError("draft and target models have different vocabularies")
        return
    if not draft.tokenizer.same_vocab(target.tokenizer):
        raise ValueError(f"draft model {draft.name!r} does not share the tokenizer of {target.name!r}; "
                         "speculative decoding with a draft model needs the same vocabulary")
