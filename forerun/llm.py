"""The Python API: LLM(model).generate(prompts, SamplingParams(...), spec=SpecConfig(...))."""
from __future__ import annotations

from collections.abc import Callable

import torch

from forerun.budget import TreeBudget
from forerun.config import SamplingParams, SpecConfig
from forerun.decode import SpeedGuard, decode
from forerun.drafters.base import Drafter, Sequence
from forerun.drafters.registry import build_drafter
from forerun.models.runtime import Runtime, load
from forerun.stream import TextStream
from forerun.types import Generation

TREE_SLOTS = 256  # KV slots past the sequence for draft trees (about 12 MB for SmolLM2 in float32)
Prompt = str | list[dict]  # plain text, or chat messages [{"role": ..., "content": ...}]


class LLM:
    """A target model plus the drafters built for it (kept across calls, so their state persists)."""

    def __init__(self, model: str | None = None, dtype: str = "float32", device: str = "cpu",
                 quant: str | None = None, runtime: Runtime | None = None):
        self.runtime = runtime or load(model, dtype=dtype, device=device, quant=quant)
        self._drafters: dict[SpecConfig, Drafter] = {}
        # what SpecConfig.guard and SpecConfig.budget learned, kept across requests
        self._guards: dict[SpecConfig, SpeedGuard] = {}
        self._budgets: dict[SpecConfig, TreeBudget] = {}

    @property
    def tokenizer(self):
        return self.runtime.tokenizer

    def drafter(self, spec: SpecConfig) -> Drafter:
        if spec not in self._drafters:
            self._drafters[spec] = build_drafter(self.runtime, spec)
        return self._drafters[spec]

    def encode(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Token ids for a prompt. chat=None applies the chat template when the model has one."""
        tok = self.tokenizer
        if isinstance(prompt, list):
            return tok.encode(tok.apply_chat_template(prompt), add_bos=False)
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt is a string or a list of chat messages, got {type(prompt).__name__}")
        if chat is None:
            chat = tok.chat_template is not None
        if chat:
            return tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), add_bos=False)
        return tok.encode(prompt)

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | None = None,
                 spec: SpecConfig | None = None, chat: bool | None = None) -> list[Generation]:
        params, spec = params or SamplingParams(), spec or SpecConfig()
        batch = [prompts] if isinstance(prompts, str) or _is_messages(prompts) else list(prompts)
        return [self.generate_ids(self.encode(p, chat), params, spec) for p in batch]

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, spec: SpecConfig,
                     on_text: Callable[[str], None] | None = None) -> Generation:
        """Decode from token ids. on_text, if given, receives text as it is accepted (streaming)."""
        seq = self.prefill(prompt_ids, params, spec)
        stopper = TextStream(self.tokenizer, params.stop, on_text)
        guard = self._guards.setdefault(spec, SpeedGuard()) if spec.guard else None
        fit = self._budgets.setdefault(spec, TreeBudget()) if spec.budget == "cost" else None
        ids, reason, stats = decode(self.runtime, seq, self.drafter(spec), spec, stopper, guard, fit)
        if reason == "stop" and stopper.stopped:
            ids = ids[: stopper.cut_ids]
        text = stopper.final_text(ids)
        return Generation(text=text, token_ids=ids, finish_reason=reason, stats=stats)

    def prefill(self, prompt_ids: list[int], params: SamplingParams, spec: SpecConfig) -> Sequence:
        rt = self.runtime
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        context = rt.context_length
        if len(prompt_ids) >= context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context holds {context}")
        budget = _tree_budget(spec)
        cache = rt.model.new_cache(len(prompt_ids) + params.max_new_tokens + budget + 1)
        with torch.inference_mode():
            if len(prompt_ids) > 1:
                body = torch.tensor(prompt_ids[:-1], device=rt.device)
                rt.model(body, torch.arange(len(body), device=rt.device), cache, 0, logits=False, prefill=True)
        generator = None
        if not params.greedy:
            generator = torch.Generator().manual_seed(params.seed if params.seed is not None else
                                                      int(torch.seed() % 2**63))
        eos = frozenset(rt.tokenizer.eos_token_ids) if rt.tokenizer is not None else frozenset()
        return Sequence(tokens=list(prompt_ids), prompt_len=len(prompt_ids), cache=cache,
                        cached=len(prompt_ids) - 1, params=params, generator=generator, eos_ids=eos)


def _tree_budget(spec: SpecConfig) -> int:
    """Cache slots beyond the sequence for one verification forward. Drafters cut their trees to
    the room left (drafters.base.room), so this only needs to be generous, not exact."""
    return max(TREE_SLOTS, 1 + spec.max_draft * spec.tree_width ** 2)


def _is_messages(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
