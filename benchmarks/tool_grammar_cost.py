"""What `tool_choice: "auto"`'s grammar (any text, but a <tool_call> tag must hold valid calls) costs
a decode step when the model answers in plain text: plain `ar` against `ar` under the grammar, greedy,
64 tokens, on chat prompts that call no tool, alternated per prompt and repeated; medians of
milliseconds per output token.

    python benchmarks/tool_grammar_cost.py --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import time

from forerun import LLM, SamplingParams, SpecConfig
from forerun.bench.harness import machine_description
from forerun.structured.tools import Tool, call_grammar

QUESTIONS = ["What is the weather like in Paris?", "Write a short poem about the sea.", "Explain photosynthesis.",
             "List three uses of copper."]
WEATHER = Tool("get_weather", "The current weather in a city",
               {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args()
    llm = LLM()
    grammar = call_grammar([WEATHER], one_per_tag=False, optional=True)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in QUESTIONS]
    seconds: dict[str, list[float]] = {"plain": [], "auto grammar": []}
    for rep in range(a.repeats):
        for prompt in prompts:
            order = (("plain", None), ("auto grammar", grammar))
            for name, structured in order if rep % 2 == 0 else order[::-1]:
                params = SamplingParams(max_tokens=a.max_tokens, temperature=0, structured=structured, ignore_eos=True)
                started = time.perf_counter()
                out = llm.generate([prompt], params, spec=SpecConfig(method="ar"))[0]
                seconds[name].append((time.perf_counter() - started) / len(out.token_ids))
    print(f"# tool_choice auto's grammar: {machine_description()}")
    for name, values in seconds.items():
        print(f"{name}: {1000 * statistics.median(values):.2f} ms a token (median of {len(values)} runs)")
    print(f"grammar / plain: {statistics.median(seconds['auto grammar']) / statistics.median(seconds['plain']):.3f}")


if __name__ == "__main__":
    main()
