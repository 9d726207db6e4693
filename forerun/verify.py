"""Verification of a draft tree against the target's outputs at every node.

Both verifiers walk the tree from the root. At each node they pick at most one child to accept;
the walk ends at a node where no child is accepted, and the target supplies the next token there.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forerun.config import SamplingParams
from forerun.sampling import sample, target_probs
from forerun.types import Draft, Verdict


def verify(draft: Draft, logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
           best: list[int] | None = None) -> Verdict:
    """The verifier a sequence's sampling asks for. logits: [N, V], the target's at every tree node;
    best, if given, their argmax (a batch computes it for all its rows at once)."""
    if params.greedy:
        return verify_greedy(draft, logits, best)
    return verify_stochastic(draft, target_probs(logits.cpu(), params), generator)


def verify_greedy(draft: Draft, logits: Tensor, best: list[int] | None = None) -> Verdict:
    """Exact match: accept the child whose token is the target's argmax at its parent.
    logits: [N, V] (or best, their argmax). The output equals plain greedy decoding token for token."""
    best = logits.argmax(dim=-1).tolist() if best is None else best  # [N]
    tokens, kids = draft.tree.tokens.tolist(), draft.tree.children
    path, node = [0], 0
    while True:
        match = next((c for c in kids[node] if tokens[c] == best[node]), None)
        if match is None:
            return Verdict(path, best[node])
        path.append(match)
        node = match


def verify_stochastic(draft: Draft, probs: Tensor, generator: torch.Generator | None) -> Verdict:
    """Recursive rejection sampling (SpecInfer's multi-step speculative sampling; Recursive SD).

    probs: [N, V], the target's processed distribution at each node. At a node with target
    distribution p, try its children in order; child x drawn from q_x is accepted with probability
    min(1, p(x) / q_x(x)). On rejection the target's distribution becomes the residual
    norm(max(p - q_x, 0)) and the next sibling is tried. If no child is accepted the next token is
    drawn from the final residual; at a leaf it is drawn from p itself (the bonus token).

    This returns tokens distributed exactly as the target's, provided each sibling's q_x is the
    distribution it was actually drawn from given the earlier siblings: i.i.d. draws share one q,
    draws without replacement renormalise q over the tokens not yet drawn, and a deterministic
    choice is a point mass (draft.q is None), for which acceptance is p(x) and the residual is p
    with x removed.
    """
    tokens, kids = draft.tree.tokens.tolist(), draft.tree.children
    draft_q = None if draft.q is None else draft.q.to(probs.device)  # a CUDA drafter's q, on the CPU
    path, node = [0], 0
    while True:
        p = probs[node]
        accepted = None
        for child in kids[node]:
            x = tokens[child]
            q = draft_q[child] if draft_q is not None else None
            q_x = 1.0 if q is None else float(q[x])
            u = float(torch.rand((), generator=generator, device=probs.device))
            if q_x > 0 and u * q_x < float(p[x]):  # u < p(x) / q(x) without dividing
                accepted = child
                break
            p = _residual(p, x, q)
        if accepted is None:
            return Verdict(path, sample(p, generator))
        path.append(accepted)
        node = accepted


def _residual(p: Tensor, x: int, q: Tensor | None) -> Tensor:
    if q is None:
        r = p.clone()
        r[x] = 0.0
    else:
        r = (p - q).clamp_(min=0.0)
    total = r.sum()
    # An empty residual means p <= q everywhere, i.e. p == q: rejection had probability zero.
    return p if total <= 0 else r / total
