"""Records passed between the stages of a decoding step: propose -> verify -> commit -> observe."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import Tensor

from forerun.tree import Tree


@dataclass(frozen=True, slots=True)
class Extra:
    """Nodes that ride along in the verification forward but are never verified or committed (e.g.
    lookahead decoding's Jacobi window). Their K/V land past the tree's slots, where the commit
    leaves them as garbage; their logits reach the drafter's observe() after the tree's."""

    tokens: Tensor  # [M] long
    depths: Tensor  # [M] long; position offsets from the root (the root is at depth 0)
    mask: Tensor  # [M, N + M] bool: the draft nodes, then the extra nodes, each extra node attends to


@dataclass(frozen=True, slots=True)
class Draft:
    """A drafter's proposal: a token tree (a chain is the degenerate one), how its tokens were drawn,
    and the nodes that ride along in its verification forward."""

    tree: Tree  # N nodes; its root is the newest token, not yet in the KV cache
    q: Tensor | None = None  # [N, V] float; row i = the distribution node i was drawn from;
    # None means every node was chosen deterministically (a point mass on its token)
    extra: Extra | None = None  # nodes run in the same forward, outside the tree
    # What the drafter knows of this draft's quality (prompt lookup: the matched n-gram's length); the
    # goodput policy keeps acceptance odds per key. Hashable; None: nothing.
    key: object = None
    forced: int = 0  # the last `forced` nodes: a chain the grammar forces, hung below the drafter's tree

    @property
    def size(self) -> int:
        return self.tree.size

    @property
    def rows(self) -> int:
        """Rows of the verification forward: the tree's nodes and the extra nodes."""
        return self.size + (0 if self.extra is None else self.extra.tokens.shape[0])


@dataclass(frozen=True, slots=True)
class Scores:
    """The target's outputs at one sequence's draft nodes (the tree, then its extra nodes), from the
    verification forward, for the drafter's observe()."""

    logits: Tensor  # [N + M, V] float32
    hidden: Tensor  # [N + M, D] final-normed hidden states (what the head read)
    layers: dict[int, Tensor]  # k -> [N + M, D]: the residual stream after k layers, for the k asked for


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature, top-k, top-p), and
    the most likely tokens at its position with theirs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # 1 + how many tokens the model found likelier (vLLM's rank)


@dataclass(frozen=True, slots=True)
class Verdict:
    path: list[int]  # accepted node indices, starting with the root 0
    next_token: int  # drawn from the target after the path: a correction or a bonus token

    @property
    def accepted(self) -> int:
        """Draft tokens accepted (the root is not a draft token)."""
        return len(self.path) - 1


@dataclass(slots=True)
class Stats:
    """One sample's account. In a batch, verify_s and wall_s are shared time: each step's forward
    serves every sequence in it."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # verification forwards this sample took part in (each emits tokens)
    prefill_tokens: int = 0  # tokens whose K/V this sample computed before its steps (prompt, recompute)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache or shared by a fork, not computed
    drafts: int = 0  # verification forwards that checked at least one draft token
    draft_tokens: int = 0  # draft tokens (tree nodes below the root) those forwards checked
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0  # from the request's arrival to its last token
    ttft_s: float = 0.0  # from the request's arrival to its first token
    queue_s: float = 0.0  # from the request's arrival to its first admission by the scheduler
    accept_histogram: Counter = field(default_factory=Counter)  # tokens per step -> steps

    @property
    def mean_accepted(self) -> float:
        """tau: new tokens per target forward (1.0 for autoregressive decoding)."""
        return self.new_tokens / max(self.target_forwards, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "prefill_tokens": self.prefill_tokens,
            "cached_tokens": self.cached_tokens,
            "drafts": self.drafts,
            "draft_tokens": self.draft_tokens,
            "mean_accepted": round(self.mean_accepted, 4),
            "wall_s": round(self.wall_s, 4),
            "ttft_s": round(self.ttft_s, 4),
            "queue_s": round(self.queue_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
            "accept_histogram": {str(k): v for k, v in sorted(self.accept_histogram.items())},
        }


@dataclass(frozen=True, slots=True)
class Generation:
    """A finished sample. For a request of n > 1 samples, LLM.generate returns sample 0 with every
    sample (itself first) in `samples`; for n = 1, `samples` is empty."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop", "length" or "abort"
    stats: Stats
    samples: tuple[Generation, ...] = ()
    logprobs: list[TokenLogprob] | None = None  # aligned with token_ids, when SamplingParams.logprobs is set
    # log p(token_ids) under the model (before any processing), summed; computed when best_of > n ranks samples
    cumulative_logprob: float = 0.0

    def to_dict(self) -> dict:
        out = {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
               "stats": self.stats.to_dict()}
        if self.logprobs is not None:
            out["logprobs"] = [{"token_id": t.token_id, "logprob": t.logprob, "top": [list(x) for x in t.top]}
                               for t in self.logprobs]
        if self.samples:
            out["samples"] = [s.to_dict() for s in self.samples]
        return out
