"""`forerun train-head`: record the target's replies to training prompts, then train an EAGLE-3 head on
them. Both stages resume where a stopped run left off (shards under OUT/data, OUT/checkpoint.pt)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from forerun.heads.data import PromptSpec
from forerun.heads.medusa_train import MedusaTrainConfig
from forerun.heads.train import TrainConfig


def add_train_head_parser(sub) -> None:
    p = sub.add_parser("train-head", help="train an EAGLE-3 draft head on the target's own replies (CPU)",
                       description=__doc__)
    p.add_argument("--out", required=True, help="folder for the data, checkpoints, head/ and curve.png")
    p.add_argument("--model", help="target: HF directory or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quant", choices=["auto", "q4", "none"], default="auto",
                   help="how the target runs while it writes the replies (default: as it serves)")
    d, t = PromptSpec(), TrainConfig()
    p.add_argument("--instruct", default=d.instruct, help="instruction prompts, JSON lines with 'prompt' and "
                   "'source' (default: %(default)s)")
    p.add_argument("--gsm8k", default=d.gsm8k, help="GSM8K train questions (default: %(default)s)")
    p.add_argument("--instruct-count", type=int, default=d.instruct_count, help="default: %(default)s")
    p.add_argument("--gsm8k-count", type=int, default=d.gsm8k_count, help="default: %(default)s")
    p.add_argument("--generated-count", type=int, default=d.generated_count,
                   help="questions the target writes itself from its chat template, Magpie-style, kept in "
                   "OUT/generated.jsonl (default: %(default)s)")
    p.add_argument("--code-count", type=int, default=d.code_count,
                   help="code tasks over functions of Python's standard library (default: %(default)s)")
    p.add_argument("--translate-count", type=int, default=d.translate_count,
                   help="sentences to translate into English, from the gettext catalogs under /usr/share/locale "
                   "(default: %(default)s)")
    p.add_argument("--summarize-count", type=int, default=0,
                   help="passages to summarize: Python's own documentation and news articles the target writes, "
                   "kept in OUT/documents.jsonl (default: %(default)s)")
    p.add_argument("--rag-count", type=int, default=0,
                   help="passages followed by a question the target wrote about one of them, kept in "
                   "OUT/documents.jsonl (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="reply length cap (default: %(default)s)")
    p.add_argument("--in-flight", type=int, default=48, help="replies decoding at once (default: %(default)s)")
    p.add_argument("--layers", default="", help="the target layers the head reads, e.g. 2,15,27 "
                   "(default: 2, half, last - 3, as EAGLE-3 and vLLM choose)")
    p.add_argument("--draft-vocab", type=int, default=t.draft_vocab, help="default: %(default)s")
    p.add_argument("--epochs", type=float, default=t.epochs, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=t.lr, help="default: %(default)s")
    p.add_argument("--unroll", type=int, default=t.unroll, help="drafting steps per row (default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=t.batch_tokens, help="default: %(default)s")
    p.add_argument("--prompt-context", type=int, default=t.prompt_context, help="default: %(default)s")
    p.add_argument("--max-prompts", type=int, default=0, help="record replies to the first N prompts drawn (0: all)")
    p.add_argument("--data", help="folder of recorded shards (default: OUT/data)")
    p.add_argument("--init-head", help="start from this head (a further stage of training) instead of a fresh one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=["eagle3", "medusa"], default="eagle3",
                   help="the head to train: an EAGLE-3 head (into OUT/head) or Medusa heads (into OUT/medusa; "
                   "--batch-tokens counts positions a step; the same recorded data serves both) (default: %(default)s)")
    p.add_argument("--medusa-heads", type=int, default=MedusaTrainConfig().heads,
                   help="--kind medusa: heads, i.e. tokens drafted past the root (default: %(default)s)")
    p.add_argument("--skip-recording", action="store_true", help="train on the shards already in OUT/data")
    p.add_argument("--record-only", action="store_true", help="record the replies and stop (train later with "
                   "--skip-recording)")
    p.set_defaults(func=cmd_train_head)


def cmd_train_head(a: argparse.Namespace) -> int:
    from forerun.config import EngineConfig
    from forerun.heads.data import document_prompts, generated_prompts, load_shards, record, training_prompts
    from forerun.heads.train import split, train
    from forerun.llm import LLM

    out = Path(a.out)
    data = Path(a.data) if a.data else out / "data"
    prompts_spec = PromptSpec(instruct=a.instruct, gsm8k=a.gsm8k, instruct_count=a.instruct_count,
                              gsm8k_count=a.gsm8k_count, generated_count=a.generated_count,
                              code_count=a.code_count, translate_count=a.translate_count, seed=a.seed)
    config = TrainConfig(draft_vocab=a.draft_vocab, epochs=a.epochs, lr=a.lr, unroll=a.unroll,
                         batch_tokens=a.batch_tokens, prompt_context=a.prompt_context, seed=a.seed)
    llm = LLM(a.model, quant=a.quant, engine=EngineConfig(prefix_caching=False, max_num_seqs=max(a.in_flight, 1)))
    args = llm.runtime.model.args
    layers = tuple(int(x) for x in a.layers.split(",")) if a.layers else \
        (2, args.num_layers // 2, args.num_layers - 3)
    generated = generated_prompts(llm, a.generated_count, out / "generated.jsonl", seed=a.seed)
    documents = document_prompts(llm, a.summarize_count, a.rag_count, out / "documents.jsonl", seed=a.seed)
    prompts = training_prompts(prompts_spec, generated, documents)
    if a.max_prompts:
        prompts = prompts[:a.max_prompts]
    if not a.skip_recording:
        started, totals = time.perf_counter(), [0, 0]

        def progress(replies: int, tokens: int, seconds: float) -> None:
            totals[0] += replies
            totals[1] += tokens
            print(f"\rrecorded {totals[0]}/{len(prompts)} replies, {totals[1]} tokens "
                  f"({tokens / max(seconds, 1e-9):.0f} tok/s, {time.perf_counter() - started:.0f} s)",
                  end="", file=sys.stderr, flush=True)

        record(llm, prompts, data, layers, max_new_tokens=a.max_new_tokens, in_flight=a.in_flight,
               seed=a.seed, progress=progress)
        print(file=sys.stderr)
        if a.record_only:
            return 0
    meta, records = load_shards(data)
    # in prompt order (shards hold replies in the order they finished); a larger earlier run's extra
    # replies stay out
    rank = {p["id"]: i for i, p in enumerate(prompts)}
    kept = [(m, r) for m, r in sorted(zip(meta, records), key=lambda mr: rank.get(mr[0]["id"], -1)) if m["id"] in rank]
    records = [r for _, r in kept]
    print(f"{len(records)} replies, {sum(len(r['tokens']) - r['prompt_len'] for r in records)} reply tokens",
          file=sys.stderr)
    if a.kind == "medusa":
        return _train_medusa(a, llm, records, out)
    out.mkdir(parents=True, exist_ok=True)  # which replies the learning curve holds back, for benchmarks/head_acceptance.py
    (out / "heldout.json").write_text(json.dumps([kept[i][0]["id"] for i in split(len(kept), config)[0]]) + "\n")
    init = None
    if a.init_head:
        from forerun.heads.eagle3 import load_head
        init = load_head(a.init_head, llm.runtime)
    train(llm.runtime, records, out, layers, config, verifier=llm.runtime.name, init=init,
          log=lambda message: print(message, file=sys.stderr, flush=True))
    print(f"head: {out / 'head'}  learning curve: {out / 'curve.png'}")
    return 0


def _train_medusa(a: argparse.Namespace, llm, records: list[dict], out: Path) -> int:
    from forerun.heads.medusa_train import train_medusa

    if a.init_head:
        raise ValueError("--init-head goes with --kind eagle3")
    config = MedusaTrainConfig(heads=a.medusa_heads, draft_vocab=a.draft_vocab, epochs=a.epochs, lr=a.lr,
                               batch_rows=a.batch_tokens, seed=a.seed)
    train_medusa(llm.runtime, records, out / "medusa", config, verifier=llm.runtime.name,
                 log=lambda message: print(message, file=sys.stderr, flush=True))
    print(f"head: {out / 'medusa' / 'head'}  learning curve: {out / 'medusa' / 'curve.png'}")
    return 0
