"""Logits processing that depends on the tokens before a position: penalties, logit bias, min_tokens,
bad words (and whatever else masks or reweights the target's logits per sequence, such as a grammar).

The contract. A sequence that asks for any of these carries one `Processors`, built by `build()` when the
sequence begins (from its SamplingParams and a `Context`) and forked with it (`n` samples share a
prefill, then each forks its parent's). Each step the engine (forerun.engine.speculation, `verify`)
hands every such sequence's draft tree to it, once, BEFORE either verifier reads the logits:

    logits = processors.apply(logits, tree)   # logits: [N, V] float32, N = tree.size, on the model's device
    ...                                       # greedy argmax / target_probs (temperature, min_p, top-k, top-p)
    processors.commit(new_tokens)             # after the step: the accepted path's tokens and the next token

Row i of `logits` is the target's distribution of the token that follows node i, that is, after every
committed token and then the tree tokens on the path from the root's child down to node i (node i
included). Node 0, the root, is the newest committed token (tree.tokens[0] == the sequence's last
token), so row 0 is the distribution after the committed tokens alone. A processor keeps what it needs
of the committed tokens (it is built with the prompt, and `commit` hands it every token the sequence
accepts, in order, the bonus or correction token included) and reads each node's path from the tree
(tree.parents, tree.tokens, tree.depths, tree.mask: ancestor-or-self, so row i's path is
tree.tokens[mask[i, 1:]] in node order). Siblings never see each other: a node's row depends only on
its own path. `apply` may write into `logits` and return it, or return a new tensor; it must not keep
it. The first token after a prefill is chosen the same way: its step's tree is the root alone.

The rows handed to `apply` are the sequence's own (a slice of the batch's); sequences with no
processors are never copied or touched. Logprobs (SamplingParams.logprobs) and what drafters observe
stay the model's own logits, before any processing, as vLLM returns them by default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from forerun.config import SamplingParams
from forerun.structured import Grammars, GrammarProcessor
from forerun.tree import Tree


class PathProcessor(Protocol):
    def apply(self, logits: Tensor, tree: Tree) -> Tensor:
        """[N, V] logits at the tree's nodes -> the processed ones (row i from node i's path)."""

    def commit(self, tokens: list[int]) -> None:
        """The tokens a step accepted, in order (the next token drawn after the path included)."""

    def fork(self) -> PathProcessor:
        """An independent copy for another sample of the same prompt."""


@dataclass(frozen=True, slots=True)
class Context:
    """What a sequence's processors are built from, besides its SamplingParams."""

    prompt_ids: tuple[int, ...]
    vocab_size: int
    eos_ids: frozenset[int]
    tokenizer: object = None  # forerun.models.tokenizer.Tokenizer; bad words need one
    grammars: Grammars | None = None  # the engine's compiled constraints; SamplingParams.structured needs them


class Processors:
    """A sequence's processors, applied in order (the order vLLM applies them in: bad words, min_tokens,
    logit bias, then the penalties)."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[PathProcessor]):
        self.parts = parts

    def apply(self, logits: Tensor, tree: Tree) -> Tensor:
        for part in self.parts:
            logits = part.apply(logits, tree)
        return logits

    def commit(self, tokens: list[int]) -> None:
        for part in self.parts:
            part.commit(tokens)

    def fork(self) -> Processors:
        return Processors([part.fork() for part in self.parts])

    @property
    def grammar(self) -> GrammarProcessor | None:
        """The structured-output part, which the engine also asks which draft nodes can be accepted
        and whether the sample is complete."""
        return next((part for part in self.parts if isinstance(part, GrammarProcessor)), None)


def build(params: SamplingParams, context: Context) -> Processors | None:
    """The processors params ask for, or None when it asks for none (the sequence then costs nothing)."""
    parts: list[PathProcessor] = []
    if params.structured is not None:
        parts.append(context.grammars.processor(params.structured))
    if params.bad_words:
        parts.append(BadWords(bad_word_ids(params.bad_words, context.tokenizer)))
    if params.min_tokens:
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(context.eos_ids))
        if stops:
            parts.append(MinTokens(params.min_tokens, sorted(stops)))
    if params.logit_bias:
        check_logit_bias(params, context.vocab_size)
        parts.append(LogitBias(params.logit_bias))
    if params.penalized:
        parts.append(Penalties(params, context.prompt_ids, context.vocab_size))
    return Processors(parts) if parts else None


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    bad = [t for t, _ in params.logit_bias if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"logit_bias: token ids must lie in [0, {vocab_size}), got {bad[:5]}")


def path_tails(tree: Tree, committed: list[int], keep: int) -> list[list[int]]:
    """[N] the last `keep` tokens before each node's row: `committed`, then the node's path below the root."""
    tokens = tree.tokens.tolist()
    tails = [committed[-keep:] if keep else []]
    for i, p in enumerate(tree.parents[1:], 1):
        tails.append((tails[p] + [tokens[i]])[-keep:] if keep else [])
    return tails


class LogitBias:
    """OpenAI's logit_bias: a fixed amount added to the logits of chosen tokens, at every position."""

    def __init__(self, bias: tuple[tuple[int, float], ...]):
        self.ids = torch.tensor([t for t, _ in bias], dtype=torch.long)
        self.values = torch.tensor([b for _, b in bias], dtype=torch.float32)

    def apply(self, logits: Tensor, tree: Tree) -> Tensor:
        ids = self.ids.to(logits.device)
        logits[:, ids] += self.values.to(logits.device)
        return logits

    def commit(self, tokens: list[int]) -> None:
        pass  # depends on no token

    def fork(self) -> LogitBias:
        return self  # holds no state


class MinTokens:
    """vLLM's min_tokens: the end tokens (EOS unless ignore_eos, and stop_token_ids) are masked at
    every position before the min_tokens-th generated token."""

    def __init__(self, min_tokens: int, stop_ids: list[int], generated: int = 0):
        self.min_tokens, self.generated = min_tokens, generated
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long)

    def apply(self, logits: Tensor, tree: Tree) -> Tensor:
        if self.generated >= self.min_tokens:
            return logits
        # row i chooses generated token number generated + depth(i) (0-based)
        early = torch.tensor(tree.depths) + self.generated < self.min_tokens  # [N]
        rows = early.nonzero()[:, 0].to(logits.device)
        logits[rows[:, None], self.stop_ids.to(logits.device)[None, :]] = float("-inf")
        return logits

    def commit(self, tokens: list[int]) -> None:
        self.generated += len(tokens)

    def fork(self) -> MinTokens:
        return MinTokens(self.min_tokens, self.stop_ids.tolist(), self.generated)


def bad_word_ids(words: tuple[str, ...], tokenizer) -> list[tuple[int, ...]]:
    """Each bad word's token ids, as vLLM takes them: the word as written (leading spaces stripped), and
    also with one leading space where that tokenizes to a different first token and as many tokens
    (a word mid-sentence)."""
    if tokenizer is None:
        raise ValueError("bad_words needs the model's tokenizer")
    out: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_bos=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_bos=False))
        out.append(bare)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    return [ids for ids in out if ids]


class BadWords:
    """vLLM's bad_words: a bad word's last token is masked wherever the generated tokens before it end
    with the rest of the word (always, for a one-token word), so no bad word is ever completed.
    As in vLLM, only generated tokens count, not the prompt."""

    def __init__(self, words: list[tuple[int, ...]], history: list[int] | None = None):
        self.words = words
        self.keep = max((len(w) - 1 for w in words), default=0)  # generated tokens a match can need
        self.history = history or []  # the last `keep` generated tokens
        self.always = torch.tensor(sorted({w[0] for w in words if len(w) == 1}), dtype=torch.long)
        self.longer = [w for w in words if len(w) > 1]

    def apply(self, logits: Tensor, tree: Tree) -> Tensor:
        if self.always.numel():
            logits[:, self.always.to(logits.device)] = float("-inf")
        if not self.longer:
            return logits
        rows, cols = [], []
        for i, tail in enumerate(path_tails(tree, self.history, self.keep)):
            for word in self.longer:
                if len(tail) >= len(word) - 1 and tuple(tail[len(tail) - len(word) + 1:]) == word[:-1]:
                    rows.append(i)
                    cols.append(word[-1])
        if rows:
            logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")
        return logits

    def commit(self, tokens: list[int]) -> None:
        if self.keep:
            self.history = (self.history + tokens)[-self.keep:]

    def fork(self) -> BadWords:
        return BadWords(self.words, list(self.history))


class Penalties:
    """OpenAI's presence and frequency penalties (over generated tokens: logit - frequency * count -
    presence * [count > 0]) after vLLM's and Hugging Face's repetition penalty (over prompt and generated
    tokens: a seen token's logit divided by it when positive, multiplied when not).

    Only the columns of tokens seen before some node are gathered and written, so a step costs
    [N, seen tokens] rather than [N, V]."""

    def __init__(self, params: SamplingParams, prompt_ids: tuple[int, ...], vocab_size: int,
                 counts: Tensor | None = None, in_prompt: Tensor | None = None, seen: Tensor | None = None):
        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty
        self.repetition = params.repetition_penalty
        self.params, self.vocab_size = params, vocab_size
        self.counts = torch.zeros(vocab_size) if counts is None else counts  # [V] generated tokens, committed
        if in_prompt is None:
            in_prompt = torch.zeros(vocab_size, dtype=torch.bool)
            if self.repetition != 1.0:
                in_prompt[torch.tensor(prompt_ids, dtype=torch.long)] = True
        self.in_prompt = in_prompt  # [V] bool; all False when repetition is off (it alone reads the prompt)
        self.seen = in_prompt.nonzero()[:, 0] if seen is None else seen  # [K] sorted: in_prompt or generated

    def apply(self, logits: Tensor, tree: Tree) -> Tensor:
        node, above = tree.mask[:, 1:].nonzero(as_tuple=True)  # node i's path: the root's child .. i
        path_tokens = tree.tokens[above + 1]
        cols = torch.unique(torch.cat([self.seen, path_tokens]))  # [K] sorted
        if not cols.numel():
            return logits
        counts = self.counts[cols].expand(tree.size, -1).clone()  # [N, K] generated before each node's row
        counts.index_put_((node, torch.searchsorted(cols, path_tokens)), torch.ones(len(node)), accumulate=True)
        device = logits.device
        counts, cols = counts.to(device), cols.to(device)
        sub = logits[:, cols]
        if self.repetition != 1.0:
            hit = (counts > 0) | self.in_prompt[cols.cpu()].to(device)
            sub = torch.where(hit, torch.where(sub > 0, sub / self.repetition, sub * self.repetition), sub)
        sub = sub - self.frequency * counts - self.presence * (counts > 0).float()
        logits[:, cols] = sub
        return logits

    def commit(self, tokens: list[int]) -> None:
        new = torch.tensor(tokens, dtype=torch.long)
        self.counts.index_add_(0, new, torch.ones(len(tokens)))
        self.seen = torch.unique(torch.cat([self.seen, new]))

    def fork(self) -> Penalties:
        return Penalties(self.params, (), self.vocab_size, self.counts.clone(), self.in_prompt, self.seen)
