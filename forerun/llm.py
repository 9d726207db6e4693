"""The Python API: LLM(model).generate(prompts, SamplingParams(...), spec=SpecConfig(...)).

Every call runs its prompts through the batched engine (forerun.engine): all of them decode
together, each with exactly the output it would have alone.
"""
from __future__ import annotations

from collections.abc import Callable

from forerun.config import EngineConfig, GenerationDefaults, SamplingParams, SpecConfig
from forerun.drafters.base import Drafter
from forerun.engine.engine import Engine
from forerun.engine.sequence import Sequence
from forerun.models.runtime import Runtime, load
from forerun.types import Generation


Prompt = str | list[dict]  # plain text, or chat messages [{"role": ..., "content": ...}]


class LLM:
    """A target model and the engine that decodes with it (its drafters, KV pool and prefix cache
    are kept across calls, so what they learn persists)."""

    def __init__(self, model: str | None = None, dtype: str = "float32", device: str = "cpu",
                 quant: str | None = "auto", runtime: Runtime | None = None, engine: EngineConfig | None = None,
                 revision: str | None = None, chat_template: str | None = None, generation_config: str = "auto"):
        """model: an HF directory, .gguf file or Hub id (at `revision`); generation_config "auto":
        generate() without params samples as the model's generation_config.json recommends, "none":
        with SamplingParams' own defaults (greedy), a folder: as its generation_config.json says."""
        if generation_config == "vllm":
            raise ValueError("generation_config must be auto, none or a folder, got 'vllm' (the server's word "
                             "for none)")
        defaults = GenerationDefaults.chosen(generation_config, GenerationDefaults())  # before the model loads
        self.runtime = runtime or load(model, dtype=dtype, device=device, quant=quant, revision=revision,
                                       chat_template=chat_template)
        self.engine = Engine(self.runtime, engine)
        if generation_config == "auto":
            defaults = self.runtime.generation
        self.default_params = SamplingParams(**defaults.given())

    @property
    def tokenizer(self):
        return self.runtime.tokenizer

    def use_drafter(self, spec: SpecConfig, drafter: Drafter) -> None:
        """Draft with `drafter` for every request of `spec` from now on (one built outside the
        registry: a draft model already in memory, a scripted drafter in a test)."""
        self.engine.use_drafter(spec, drafter)

    def drafter(self, spec: SpecConfig) -> Drafter:
        return self.engine.drafter(spec)

    def prefill(self, prompt_ids: list[int], params: SamplingParams, spec: SpecConfig) -> Sequence:
        """A sequence cached up to its root, its drafter begun: to call the drafter directly.
        Engine.release() gives it back."""
        return self.engine.prefilled(prompt_ids, params, spec)

    def score(self, prompt_ids: list[int], continuation_ids: list[int]) -> list[float]:
        """log p(continuation_ids[j] | prompt_ids + continuation_ids[:j]) for every j, in one forward."""
        return self.engine.score(prompt_ids, continuation_ids)

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
        """One Generation per prompt, decoded together. With params.n > 1 each is the prompt's first
        sample, and its `samples` holds all n."""
        batch = [prompts] if isinstance(prompts, str) or _is_messages(prompts) else list(prompts)
        return self.generate_batch_ids([self.encode(p, chat) for p in batch], params, spec)

    def generate_batch_ids(self, prompt_ids: list[list[int]], params: SamplingParams | None = None,
                           spec: SpecConfig | None = None) -> list[Generation]:
        """generate() from token ids."""
        params, spec = params or self.default_params, spec or SpecConfig()
        ids = []
        try:
            for prompt in prompt_ids:
                ids.append(self.engine.add_request(prompt, params, spec))
            done = self._run(set(ids), None)
        finally:
            for request_id in ids:  # an error (or Ctrl-C) mid-run leaves nothing queued behind
                self.engine.abort(request_id)
        return [_as_result(done[request_id]) for request_id in ids]

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, spec: SpecConfig,
                     on_text: Callable[[str], None] | None = None) -> Generation:
        """Decode one prompt from token ids. on_text, if given, receives text as it is accepted."""
        request_id = self.engine.add_request(prompt_ids, params, spec, stream_text=on_text is not None)
        try:
            done = self._run({request_id}, on_text)
        finally:
            self.engine.abort(request_id)
        return _as_result(done[request_id])

    def _run(self, waiting_for: set[str], on_text: Callable[[str], None] | None) -> dict[str, tuple[Generation, ...]]:
        done = {}
        while waiting_for - done.keys():
            for out in self.engine.step():
                if on_text is not None and out.request_id in waiting_for:
                    for sample in out.samples:
                        if sample.text:
                            on_text(sample.text)
                if out.finished:
                    done[out.request_id] = out.generations
        return done


def _as_result(generations: tuple[Generation, ...]) -> Generation:
    if len(generations) == 1:
        return generations[0]
    first = generations[0]
    return Generation(first.text, first.token_ids, first.finish_reason, first.stats, samples=generations)


def _is_messages(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
