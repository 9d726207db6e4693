"""Command line: a thin mapping from arguments onto SamplingParams, SpecConfig and LLM."""
from __future__ import annotations

import argparse
import json
import sys

from forerun.bench.cli import add_bench_parser
from forerun.cli_args import (add_engine_args, add_model_args, add_speculation_args, engine_config, model_options,
                              spec_config)
from forerun.config import SamplingParams, SpecConfig, StructuredOutput
from forerun.heads.cli import add_train_head_parser
from forerun.options import coerce, split_option
from forerun.retrieval.cli import add_datastore_parser
from forerun.scaling.cli import add_scale_parser
from forerun.serve.cli import add_serve_parsers


def _decode_args(p: argparse.ArgumentParser) -> None:
    add_speculation_args(p)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("-n", "--n", type=int, default=1, help="samples of the prompt, from one prefill (default: 1)")
    p.add_argument("--best-of", type=int, default=None,
                   help="sample this many and keep the n of highest cumulative logprob (needs --temperature > 0)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, over generated tokens, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, over generated tokens, in [-2, 2]")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="vLLM's and Hugging Face's, over prompt and generated tokens, > 0 (1: off)")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (in [-100, 100]) to token ID's logit (repeatable)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this share of the likeliest's probability")
    p.add_argument("--min-tokens", type=int, default=0, help="generate at least this many tokens before EOS or a stop")
    p.add_argument("--bad-word", action="append", default=[], dest="bad_words",
                   help="a word never to generate (repeatable)")
    p.add_argument("--json-schema", metavar="FILE", help="answer with JSON valid against the schema in FILE")
    p.add_argument("--json-object", action="store_true", help="answer with a JSON object")
    p.add_argument("--regex", help="answer with text matching this regular expression")
    p.add_argument("--choice", action="append", default=[], help="answer with one of these strings (repeatable)")
    p.add_argument("--grammar", metavar="FILE", help="answer with text of the Lark or GBNF grammar in FILE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forerun", description="Fast, exact speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion and print it with its stats")
    gen.add_argument("prompt", nargs="?", help="prompt text (or use --prompt-file, or stdin)")
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="apply the chat template (default: when the model has one)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    add_model_args(gen)
    add_engine_args(gen)
    _decode_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat, streaming tokens as they are accepted")
    add_model_args(chat)
    add_engine_args(chat)
    _decode_args(chat)
    chat.set_defaults(func=cmd_chat)

    add_bench_parser(sub)
    add_datastore_parser(sub)
    add_scale_parser(sub)
    add_serve_parsers(sub)
    add_train_head_parser(sub)
    return parser


def sampling_params(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                          max_new_tokens=a.max_new_tokens, stop=tuple(a.stop), ignore_eos=a.ignore_eos, n=a.n,
                          best_of=a.best_of, presence_penalty=a.presence_penalty,
                          frequency_penalty=a.frequency_penalty, repetition_penalty=a.repetition_penalty,
                          logit_bias=_logit_bias(a.logit_bias), min_p=a.min_p, min_tokens=a.min_tokens,
                          bad_words=tuple(a.bad_words), structured=structured_output(a))


def structured_output(a: argparse.Namespace) -> StructuredOutput | None:
    """The constraint the flags ask for (at most one of them), or None."""
    asked = {"json": _read(a.json_schema), "json_object": a.json_object, "regex": a.regex,
             "choice": tuple(a.choice) or None, "grammar": _read(a.grammar)}
    asked = {name: value for name, value in asked.items() if value}
    return StructuredOutput(**asked) if asked else None


def _read(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _logit_bias(pairs: list[str]) -> dict[int, float]:
    """["13=5", "7=-100"] -> {13: 5.0, 7: -100.0}."""
    bias = {}
    for pair in pairs:
        token, value = split_option(pair, "--logit-bias", "ID=BIAS")
        bias[coerce("--logit-bias id", token, int)] = coerce(f"--logit-bias {token}", value, float)
    return bias


def _llm(a: argparse.Namespace):
    from forerun.llm import LLM
    return LLM(a.model, **model_options(a), engine=engine_config(a))


def _read_prompt(a: argparse.Namespace) -> str:
    if a.prompt is not None and a.prompt_file:
        raise ValueError("give a prompt or --prompt-file, not both")
    if a.prompt_file:
        with open(a.prompt_file, encoding="utf-8") as f:
            return f.read()
    if a.prompt is not None:
        return a.prompt
    if not sys.stdin.isatty():
        return sys.stdin.read()
    raise ValueError("no prompt: pass PROMPT, --prompt-file FILE, or pipe text on stdin")


def cmd_generate(a: argparse.Namespace) -> int:
    params, spec, prompt = sampling_params(a), spec_config(a), _read_prompt(a)
    engine_config(a)  # bad engine limits fail here, before the model loads
    llm = _llm(a)
    ids = llm.encode(prompt, chat=a.chat)
    if a.json:
        print(json.dumps(llm.generate_ids(ids, params, spec).to_dict(), ensure_ascii=False))
        return 0
    if params.samples > 1:  # the samples decode together; each (of the best, with best_of) is printed whole
        out = llm.generate_ids(ids, params, spec)
        for i, sample in enumerate(out.samples or (out,)):
            print(f"--- sample {i} ---\n{sample.text}")
            _print_stats(spec, sample)
        return 0
    out = llm.generate_ids(ids, params, spec, on_text=lambda t: print(t, end="", flush=True))
    print()
    _print_stats(spec, out)
    return 0


def _print_stats(spec: SpecConfig, out) -> None:
    s = out.stats
    print(f"\n[{spec.method}] {s.new_tokens} tokens in {s.wall_s:.2f}s = {s.tokens_per_s:.1f} tok/s, "
          f"{s.target_forwards} target forwards, tau {s.mean_accepted:.2f}, first token after {s.ttft_s:.2f}s, "
          f"finish: {out.finish_reason}", file=sys.stderr)


def cmd_chat(a: argparse.Namespace) -> int:
    params, spec = sampling_params(a), spec_config(a)
    if params.samples > 1:
        raise ValueError("chat answers one sample a turn: leave -n at 1 and --best-of unset")
    llm = _llm(a)
    messages: list[dict] = []
    print("forerun chat: empty line or Ctrl-D to quit, /reset to start over.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if not line:
            return 0
        if line == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": line})
        out = llm.generate_ids(llm.encode(messages), params, spec,
                               on_text=lambda t: print(t, end="", flush=True))
        messages.append({"role": "assistant", "content": out.text})
        s = out.stats
        print(f"\n[{s.tokens_per_s:.1f} tok/s, tau {s.mean_accepted:.2f}]", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"forerun: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
