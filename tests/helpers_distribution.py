"""Checks that sampled tokens follow an exact distribution, shared by the distribution tests.

A toy "bigram" world stands in for the models: the target's distribution after token a is row a of
P, the drafter's is row a of Q, and the sequence starts at ROOT. Each trial drafts from Q (so q is
the true proposal distribution), verifies against P, and records the first two emitted tokens; their
joint law must be P[ROOT, x1] * P[x1, x2] and their histogram is checked with a chi-square test.

Threshold: Pearson's statistic sum((O - E)^2 / E) over B bins is asymptotically chi-square with
B - 1 degrees of freedom when the counts follow the expected law. Bins with E < 5, where that
approximation is poor, are pooled. The quantile needs no scipy: by Wilson and Hilferty, (X / k)^(1/3)
for X ~ chi2_k is close to normal with mean 1 - 2 / (9k) and variance 2 / (9k), so
chi2_k(1 - alpha) ~= k * (1 - 2/(9k) + z_(1-alpha) * sqrt(2/(9k)))^3. For alpha = 1e-4 that is within
a few percent of the exact quantile and slightly above it (conservative) for every k >= 1. Seeds are
fixed, so each test is deterministic; alpha bounds the chance that a correct verifier fails if the
seed or the order of random draws changes. The negative control shows the same test has the power to
catch a verifier fed the wrong q.
"""
import random
from collections.abc import Callable
from statistics import NormalDist

import torch

from conftest import tiny_runtime
from forerun import SamplingParams
from forerun.models.batch import ForwardBatch
from forerun.sampling import gumbel_top_k, target_probs
from forerun.tree import Tree
from forerun.types import Draft
from forerun.verify import verify_stochastic

ALPHA = 1e-4
MIN_EXPECTED = 5.0
TRIALS = 3_000
ROOT = 0


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """(Pearson statistic, its 1 - ALPHA quantile) for counts [B] against probabilities [B] > 0."""
    expected = counts.sum() * probs
    small = expected < MIN_EXPECTED
    obs, exp = counts[~small], expected[~small]
    if small.any():
        obs, exp = torch.cat([obs, counts[small].sum()[None]]), torch.cat([exp, expected[small].sum()[None]])
        if exp[-1] < MIN_EXPECTED:  # the pooled bin is itself too small: merge it into the smallest bin
            j = int(exp[:-1].argmin())
            obs[j], exp[j] = obs[j] + obs[-1], exp[j] + exp[-1]
            obs, exp = obs[:-1], exp[:-1]
    statistic = float(((obs - exp) ** 2 / exp).sum())
    k = len(obs) - 1
    z = NormalDist().inv_cdf(1 - ALPHA)
    return statistic, k * (1 - 2 / (9 * k) + z * (2 / (9 * k)) ** 0.5) ** 3


def assert_distributed_as(samples: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    """samples: [n] cell indices; probs: [B] exact probabilities. Impossible cells must stay empty."""
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    probs = probs.double().flatten()
    assert counts[probs == 0].sum() == 0, f"{what}: emitted a token the target gives probability 0"
    statistic, threshold = chi_square(counts[probs > 0], probs[probs > 0] / probs.sum())
    assert statistic < threshold, f"{what}: chi-square {statistic:.1f} >= {threshold:.1f}"


def assert_first_two_match(pairs: torch.Tensor, P: torch.Tensor) -> None:
    """pairs: [n, 2] first two emitted tokens; checks the first token's law and the joint law."""
    V = P.shape[-1]
    assert_distributed_as(pairs[:, 0], P[ROOT], "first token")
    assert_distributed_as(pairs[:, 0] * V + pairs[:, 1], P[ROOT][:, None] * P, "first two tokens")


Proposer = Callable[[int, torch.Tensor, "Rng"], Draft]  # (root, Q [V, V], randomness) -> Draft


class Rng:
    """The harness's randomness: a torch generator for forerun's own samplers and Python's random
    for the drafts' plain draws (torch.multinomial costs ~40 us a call, random.choices ~5 us)."""

    def __init__(self, seed: int):
        self.torch = torch.Generator().manual_seed(seed)
        self.py = random.Random(seed)

    def draw(self, probs: torch.Tensor, k: int = 1) -> list[int]:
        return self.py.choices(range(probs.shape[0]), weights=probs.tolist(), k=k)


def emit_pairs(propose: Proposer, P: torch.Tensor, Q: torch.Tensor, n: int, seed: int = 0,
               q_seen: Callable[[Draft], Draft] | None = None) -> torch.Tensor:
    """Run n decodes of two tokens from ROOT, each step proposing from Q and verifying against P.
    q_seen, if given, rewrites the draft the verifier sees (the negative control)."""
    rng = Rng(seed)
    out = []
    for _ in range(n):
        emitted, root = [], ROOT
        while len(emitted) < 2:
            draft = propose(root, Q, rng)
            seen = q_seen(draft) if q_seen else draft
            verdict = verify_stochastic(seen, P[draft.tree.tokens], rng.torch)
            emitted += draft.tree.tokens[verdict.path[1:]].tolist() + [verdict.next_token]
            root = emitted[-1]
        out.append(emitted[:2])
    return torch.tensor(out)


# --- proposers: each q row is the distribution its token was really drawn from -------------------

def chain(depth: int) -> Proposer:
    def propose(root, Q, rng):
        tokens = [root]
        for _ in range(depth):
            tokens += rng.draw(Q[tokens[-1]])
        q = torch.cat([torch.zeros(1, Q.shape[1]), Q[tokens[:-1]]])  # node i drawn from Q[parent token]
        return Draft(Tree(tokens=torch.tensor(tokens), parents=list(range(-1, depth))), q)
    return propose


def iid_siblings(k: int) -> Proposer:
    """SpecInfer: k children of the root drawn independently (repeats allowed) from one q."""
    def propose(root, Q, rng):
        q = torch.cat([torch.zeros(1, Q.shape[1]), Q[root].expand(k, -1)])
        return Draft(Tree(tokens=torch.tensor([root, *rng.draw(Q[root], k)]), parents=[-1] + [0] * k), q)
    return propose


def without_replacement(k: int, grandchildren: bool = False) -> Proposer:
    """k distinct children by Gumbel-top-k; sibling j's q is Q renormalised over the undrawn tokens.
    With grandchildren, each child also gets one child drawn from Q[child], making a 2-level tree."""
    def propose(root, Q, rng):
        tokens, parents, rows = [root], [-1], [torch.zeros(Q.shape[1])]
        remaining = Q[root].clone()
        for t in gumbel_top_k(Q[root], k, rng.torch):
            tokens.append(t), parents.append(0), rows.append(remaining / remaining.sum())
            remaining[t] = 0.0
        if grandchildren:
            for child in range(1, len(tokens)):
                tokens += rng.draw(Q[tokens[child]])
                parents.append(child), rows.append(Q[tokens[child]])
        return Draft(Tree(tokens=torch.tensor(tokens), parents=parents), torch.stack(rows))
    return propose


def fixed_children(kids: list[int]) -> Proposer:
    """Deterministic children (e.g. greedy top-k): q is None, a point mass on each token."""
    def propose(root, Q, rng):
        return Draft(Tree(tokens=torch.tensor([root, *kids]), parents=[-1] + [0] * len(kids)))
    return propose


def bigram_world(V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) [V, V]: rows differ so rejections are common. The drafter never proposes the last
    token (only a residual can emit it) and the target never emits token 1 after token 2."""
    g = torch.Generator().manual_seed(seed)
    P = torch.softmax(1.5 * torch.randn(V, V, generator=g), dim=-1)
    P[2, 1] = 0.0
    Q = torch.softmax(1.5 * torch.randn(V, V, generator=g), dim=-1)
    Q[:, -1] = 0.0
    return P / P.sum(-1, keepdim=True), Q / Q.sum(-1, keepdim=True)


# --- end to end: the whole decode loop with real (tiny) models ------------------------------------

E2E_VOCAB = 8
E2E_PROMPT = [5]  # one token: prefill runs no forward, keeping each trial to a few forwards
E2E_TRIALS = 500
E2E_PARAMS = dict(temperature=1.0, max_new_tokens=2, ignore_eos=True)


def flat_runtime(seed: int):
    """A tiny random model whose head is scaled down: random weights give near one-hot
    distributions, which would leave the test nothing to measure."""
    rt = tiny_runtime(seed=seed, layers=2, vocab_size=E2E_VOCAB)
    with torch.no_grad():
        rt.model.head.weight.mul_(0.3)
    return rt


@torch.inference_mode()
def exact_first_two(rt) -> torch.Tensor:
    """[V, V] joint law of the first two tokens: p(x1) * p(x2 | x1), from one forward per x1."""
    params = SamplingParams(**E2E_PARAMS)

    def next_probs(tokens: list[int]) -> torch.Tensor:
        batch = ForwardBatch.contiguous(torch.tensor(tokens), torch.arange(len(tokens)), 0)
        logits = rt.model(batch, rt.model.new_cache(len(tokens))).logits
        return target_probs(logits[-1].cpu(), params)

    p1 = next_probs(E2E_PROMPT)
    p2 = torch.stack([next_probs(E2E_PROMPT + [x]) for x in range(E2E_VOCAB)])
    return p1[:, None] * p2


# --- the first three tokens through the whole decode loop ------------------------------------------

@torch.inference_mode()
def target_logits(rt, prompt: list[int]) -> torch.Tensor:
    """[V, V, 3, V]: the target's logits after prompt, prompt + x1 and prompt + x1 + x2 (index x1, x2),
    one plain causal forward per (x1, x2)."""
    vocab = rt.model.args.vocab_size
    out = torch.empty(vocab, vocab, 3, vocab)
    for x1 in range(vocab):
        for x2 in range(vocab):
            tokens = torch.tensor(prompt + [x1, x2])
            batch = ForwardBatch.contiguous(tokens, torch.arange(len(tokens)), 0)
            out[x1, x2] = rt.model(batch, rt.model.new_cache(len(tokens))).logits[-3:].cpu()
    return out


def assert_follows(triples: torch.Tensor, joint: torch.Tensor, what: str) -> None:
    """Each token's marginal, each adjacent pair and the whole triple against `joint` [V, V, V]."""
    V = joint.shape[0]
    assert_distributed_as(triples[:, 0], joint.sum((1, 2)), f"{what}: first token")
    assert_distributed_as(triples[:, 1], joint.sum((0, 2)), f"{what}: second token")
    assert_distributed_as(triples[:, 2], joint.sum((0, 1)), f"{what}: third token")
    assert_distributed_as(triples[:, 0] * V + triples[:, 1], joint.sum(2).flatten(), f"{what}: tokens 1-2")
    assert_distributed_as(triples[:, 1] * V + triples[:, 2], joint.sum(0).flatten(), f"{what}: tokens 2-3")
    cells = (triples[:, 0] * V + triples[:, 1]) * V + triples[:, 2]
    assert_distributed_as(cells, joint.flatten(), f"{what}: tokens 1-3")
