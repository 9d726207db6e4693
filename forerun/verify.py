"""Verification of draft trees against the target's outputs at every node.

Both verifiers walk each tree from the root. At each node they pick at most one child to accept;
the walk ends at a node where no child is accepted, and the target supplies the next token there.

verify_batch verifies a whole step's drafts at once on flat tensors, laid out as vLLM's rejection
sampler lays out its batch: every draft's rows one after another, each sequence at its offset. Its
greedy drafts share one argmax over all rows; its sampled drafts share one gather of p(x) and q(x)
at every node, and one random draw per generator, made before the walk.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forerun.config import SamplingParams
from forerun.sampling import target_probs
from forerun.types import Draft, Verdict


def verify_batch(drafts: list[Draft], logits: Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[Verdict]:
    """Each draft's verdict, by the verifier its sequence's sampling asks for. logits: [R, V], the
    target's at every draft's rows, draft after draft (draft b's tree nodes, then its extra nodes,
    which are not verified). generators: each sequence's random stream (None when greedy).

    A sequence's uniforms come from its own generator, so a seeded request draws the same numbers
    alone or in any batch; sequences sharing a generator (the engine's, for unseeded requests) share
    one draw."""
    offsets = _offsets(drafts)  # [B + 1]: draft b's rows start at offsets[b]
    verdicts: list[Verdict | None] = [None] * len(drafts)
    greedy = [b for b, p in enumerate(params) if p.greedy]
    if greedy:
        best = logits.argmax(dim=-1).tolist()  # one call for every greedy sequence's rows
        for b in greedy:
            verdicts[b] = verify_greedy(drafts[b], best=best[offsets[b]:offsets[b] + drafts[b].size])
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if sampled:
        probs = _target_probs(logits, [offsets[b] for b in sampled], [drafts[b].size for b in sampled],
                              [params[b] for b in sampled])
        u = _uniforms([drafts[b].size for b in sampled], [generators[b] for b in sampled])
        for b, verdict in zip(sampled, rejection_sample([drafts[b] for b in sampled], probs, u)):
            verdicts[b] = verdict
    return verdicts


def verify_greedy(draft: Draft, logits: Tensor | None = None, best: list[int] | None = None) -> Verdict:
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
    """rejection_sample for one draft, its uniforms drawn from `generator`. probs: [N, V]."""
    return rejection_sample([draft], probs, _uniforms([draft.size], [generator]))[0]


def rejection_sample(drafts: list[Draft], probs: Tensor, u: Tensor) -> list[Verdict]:
    """Recursive rejection sampling (SpecInfer's multi-step speculative sampling; Recursive SD).

    probs: [N, V], the target's processed distribution at every node of every draft, draft after
    draft (N = the drafts' sizes summed); u: [N] float64 uniforms, one per node: a child's decides
    whether it is accepted, a root's draws its sequence's next token.

    At a node with target distribution p, try its children in order; child x drawn from q_x is
    accepted with probability min(1, p(x) / q_x(x)). On rejection the target's distribution becomes
    the residual norm(max(p - q_x, 0)) and the next sibling is tried. If no child is accepted the
    next token is drawn from the final residual; at a leaf it is drawn from p itself (the bonus token).

    This returns tokens distributed exactly as the target's, provided each sibling's q_x is the
    distribution it was actually drawn from given the earlier siblings: i.i.d. draws share one q,
    draws without replacement renormalise q over the tokens not yet drawn, and a deterministic
    choice is a point mass (draft.q is None), for which acceptance is p(x) and the residual is p
    with x removed.

    A child tried first at its node meets p itself, so p(x) and q_x(x) of every node are gathered
    for the whole batch at once; only siblings tried after a rejection read a residual.
    """
    starts = _starts(drafts)
    tokens = torch.cat([d.tree.tokens for d in drafts]).to(probs.device)  # [N]
    parents = torch.cat([torch.tensor(d.tree.parents).clamp(min=0) + s for d, s in zip(drafts, starts)])  # [N]
    p_x = probs[parents.to(probs.device), tokens].tolist()  # [N]: p(x) at each node's parent (roots: unused)
    q_x = torch.ones(len(tokens), dtype=probs.dtype)  # [N]: q_x(x), 1 for a point mass
    for d, s in zip(drafts, starts):
        if d.q is not None:
            q_x[s:s + d.size] = d.q.to(probs.device).gather(1, d.tree.tokens[:, None].to(probs.device))[:, 0]
    q_x, uniforms = q_x.tolist(), u.tolist()
    paths, last = [], []  # per draft: its accepted path, and the distribution its next token comes from
    for d, s in zip(drafts, starts):
        path, final = _walk(d, probs[s:s + d.size], p_x, q_x, uniforms, s)
        paths.append(path)
        last.append(final)
    next_tokens = _inverse_cdf(torch.stack(last), u[starts])
    return [Verdict(path, token) for path, token in zip(paths, next_tokens)]


def _walk(draft: Draft, probs: Tensor, p_x: list[float], q_x: list[float], u: list[float], start: int
          ) -> tuple[list[int], Tensor]:
    """One draft's accepted path, and the distribution [V] its next token is drawn from. probs: [N, V]
    at its nodes; p_x, q_x and u: the whole batch's, the draft's nodes from `start` on."""
    tokens, kids = draft.tree.tokens.tolist(), draft.tree.children
    q = None if draft.q is None else draft.q.to(probs.device)
    path, node = [0], 0
    while True:
        p = None  # None: the node's own distribution, probs[node], which p_x holds for its children
        accepted = None
        for child in kids[node]:
            x, at = tokens[child], start + child
            target = p_x[at] if p is None else float(p[x])
            if q_x[at] > 0 and u[at] * q_x[at] < target:  # u < p(x) / q(x) without dividing
                accepted = child
                break
            p = _residual(probs[node] if p is None else p, x, None if q is None else q[child])
        if accepted is None:
            return path, probs[node] if p is None else p
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


def _inverse_cdf(probs: Tensor, u: Tensor) -> list[int]:
    """One token from each row of probs [B, V] (each a distribution, maybe unnormalised), with
    uniform u [B] float64: the first token whose cumulative mass exceeds u times the row's total (as
    forerun.sampling.sample draws one)."""
    cum = probs.double().cumsum(dim=-1)  # [B, V]
    drawn = torch.searchsorted(cum, (u.to(cum.device) * cum[:, -1])[:, None], right=True)[:, 0]
    out = drawn.tolist()
    for b in (b for b, t in enumerate(out) if t == probs.shape[1]):  # u rounded up to the total
        out[b] = int(torch.nonzero(probs[b]).max())  # the last token with any mass
    return out


def _target_probs(logits: Tensor, offsets: list[int], sizes: list[int], params: list[SamplingParams]) -> Tensor:
    """[sum(sizes), V] float32 on the CPU: the processed distribution at every tree node of the sampled
    sequences (sequence i's rows are offsets[i]:offsets[i] + sizes[i] of logits), one processing
    call for the sequences that sample alike."""
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    probs = torch.empty(starts[-1], logits.shape[1])
    alike: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        alike.setdefault((p.temperature, p.min_p, p.top_k, p.top_p), []).append(i)
    for group in alike.values():
        rows = torch.cat([torch.arange(offsets[i], offsets[i] + sizes[i]) for i in group])
        into = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in group])
        probs[into] = target_probs(logits[rows.to(logits.device)].cpu(), params[group[0]])
    return probs


def _uniforms(sizes: list[int], generators: list[torch.Generator | None]) -> Tensor:
    """[sum(sizes)] float64: sequence i's sizes[i] uniforms from its own generator, one draw per
    generator (for all the sequences that share it, in order)."""
    shared: dict[torch.Generator | None, list[int]] = {}
    for i, g in enumerate(generators):
        shared.setdefault(g, []).append(i)
    parts: list[Tensor | None] = [None] * len(sizes)
    for g, group in shared.items():
        drawn = torch.rand(sum(sizes[i] for i in group), generator=g, dtype=torch.float64)
        for i, u in zip(group, drawn.split([sizes[i] for i in group])):
            parts[i] = u
    return torch.cat(parts)


def _starts(drafts: list[Draft]) -> list[int]:
    """Where each draft's tree nodes start in a flat layout of tree nodes only."""
    return torch.tensor([0] + [d.size for d in drafts[:-1]]).cumsum(0).tolist()


def _offsets(drafts: list[Draft]) -> list[int]:
    """[B + 1]: where each draft's rows (tree and extra nodes) start in a forward's logits."""
    return torch.tensor([0] + [d.rows for d in drafts]).cumsum(0).tolist()
