"""What structured outputs cost on top of decoding (forerun.structured, on llguidance).

Times, for the embedded model's tokenizer (or --model's): reading the vocabulary once (Grammars),
compiling a typical JSON schema (cold, then from the cache), the mask of one row along a valid
answer (every token of it, one step each), the mask of a draft tree (a chain of 4 and a tree of 10
nodes, the walk with rollbacks), and whole greedy answers of the model with and without the schema's
grammar, alternating, so the per-token share of the mask is measured in the same run.

    python benchmarks/structured_masks.py --quant q4
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from forerun import LLM, SamplingParams, SpecConfig
from forerun.config import StructuredOutput
from forerun.structured import Grammars
from forerun.tree import Tree

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "email", "address", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
                         "email": {"type": "string", "pattern": "^[a-z.]+@[a-z]+\\.[a-z]{2,3}$"},
                         "address": {"type": "object", "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}},
                         "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}}}}
ANSWER = {"name": "Ada Lovelace", "age": 36, "email": "ada@math.org", "address": {"city": "London", "zip": "W1"},
          "tags": ["admin", "user"]}


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quant", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=64)
    a = p.parse_args()
    llm = LLM(a.model, quant=a.quant)
    tokenizer, vocab = llm.tokenizer, llm.runtime.model.args.vocab_size
    spec = StructuredOutput(json=SCHEMA)

    vocab_s = []
    for _ in range(3):
        start = time.perf_counter()
        grammars = Grammars(tokenizer, vocab)
        vocab_s.append(time.perf_counter() - start)
    compile_s = [timed(lambda: grammars.processor(spec))]  # the first: compiled
    cached_s = [timed(lambda: grammars.processor(spec)) for _ in range(50)]  # then copied from the cache

    ids = tokenizer.encode(json.dumps(ANSWER), add_bos=False)
    root_ms, chain_ms, tree_ms = [], [], []
    for _ in range(a.repeats):
        processor = grammars.processor(spec)
        logits = torch.zeros(10, vocab)
        for j, token in enumerate(ids):
            root = Tree(tokens=torch.tensor([token]), parents=[-1])
            root_ms.append(timed(lambda: processor.apply(logits[:1], root)))
            if j + 4 < len(ids):  # the next four tokens as a chain, then a tree with two wrong siblings each
                chain = Tree(tokens=torch.tensor(ids[j:j + 5]), parents=[-1, 0, 1, 2, 3])
                chain_ms.append(timed(lambda: processor.apply(logits[:5], chain)))
                wide = ids[j:j + 4] + [ids[j + 1] + 1, ids[j + 1] + 2, ids[j + 2] + 1, ids[j + 2] + 2,
                                       ids[j + 3] + 1, ids[j + 3] + 2]
                tree = Tree(tokens=torch.tensor(wide), parents=[-1, 0, 1, 2, 0, 0, 1, 1, 2, 2])
                tree_ms.append(timed(lambda: processor.apply(logits, tree)))
            processor.commit([token])

    prompt = llm.encode([{"role": "user", "content": "Describe a person as JSON."}])
    free = SamplingParams(max_new_tokens=a.max_new_tokens, ignore_eos=True)
    bound = SamplingParams(max_new_tokens=a.max_new_tokens, structured=spec)
    per_token = {"free": [], "schema": []}
    for i in range(a.repeats + 1):  # the first round warms both up
        for name, params in (("free", free), ("schema", bound)):
            out = llm.generate_ids(prompt, params, SpecConfig(method="ar", forced_tokens=False))  # plain steps
            if i:
                per_token[name].append(out.stats.wall_s / max(len(out.token_ids), 1))

    rows = [("read the vocabulary (Grammars)", median_ms(vocab_s)),
            ("compile the schema, cold", median_ms(compile_s)),
            ("a sample's matcher, compiled (cached)", median_ms(cached_s)),
            ("mask of one row (median over an answer's tokens)", median_ms(root_ms)),
            ("mask of a chain of 4 drafts (5 rows)", median_ms(chain_ms)),
            ("mask of a 10-node tree", median_ms(tree_ms)),
            ("ar step, no grammar (per token)", median_ms(per_token["free"])),
            ("ar step, schema (per token)", median_ms(per_token["schema"]))]
    print(f"model {llm.runtime.name}, vocabulary {vocab}, torch threads {torch.get_num_threads()}\n")
    print("| what | median ms |\n|---|---|")
    for what, ms in rows:
        print(f"| {what} | {ms:.3f} |")
    print(f"\nmask share of a one-row step: {median_ms(root_ms) / median_ms(per_token['free']):.1%}")


if __name__ == "__main__":
    main()
