"""The flags that several commands share, and the configs they map onto: the model (`generate`,
`chat`, `serve`, `scale`, `bench`), the engine's limits and the speculation, whose `--opt NAME=VALUE` reaches
every drafter's own options. Each command adds the groups it takes with add_*_args(parser)."""
from __future__ import annotations

import argparse

from forerun.config import EngineConfig, SpecConfig
from forerun.options import parse_options


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model directory, .gguf file, or Hugging Face Hub id org/name (from the Hub's "
                                   "cache; downloaded unless HF_HUB_OFFLINE=1); a GGUF on the Hub as org/name:QUANT or "
                                   "org/name/FILE.gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--revision", default=None, help="with a Hub id: the branch, tag or commit (default: main)")
    # float32 stays the default: on a GPU it is the batch-invariant path on which speculation's greedy
    # output equals ar's; bfloat16 can differ at near-ties there (docs/models.md)
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="default float32; auto (vLLM's default): float32 on the CPU, bfloat16 on a GPU that runs "
                        "it (else float16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quant", choices=["auto", "q4", "none"], default="auto",
                   help="q4: GGUF-style 4-bit block weights and an 8-bit head on native CPU kernels (float32 "
                        "only); none: dequantize to --dtype; auto (default): q4 for a Q4_1 GGUF such as the "
                        "embedded model on the CPU in float32, none otherwise")
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="a Jinja chat template (a file, or the text itself) used instead of the model's")


def model_options(a: argparse.Namespace) -> dict:
    """The keyword arguments of forerun.models.runtime.load (and LLM) that add_model_args' flags give."""
    return dict(dtype=a.dtype, device=a.device, quant=a.quant, revision=a.revision, chat_template=a.chat_template)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The flags engine_config() reads."""
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV pool size in tokens (default: --max-num-seqs sequences of 2048 tokens, at most a quarter "
                        "of free memory, at least one full context)")
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig().max_num_seqs,
                   help="sequences decoding at once (default: %(default)s)")
    p.add_argument("--max-step-tokens", type=int, default=EngineConfig().max_step_tokens,
                   help="prompt tokens a step may compute beside decoding (default: %(default)s)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV of prompt blocks computed by earlier requests")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="tokens a sequence may hold, prompt and output together (default: the model's context); "
                        "also the KV pool's floor, which is otherwise one whole context")


def add_speculation_args(p: argparse.ArgumentParser, method: str = "pld") -> None:
    """The flags spec_config() reads; `method` is the command's default method."""
    p.add_argument("--method", default=method, help=f"ar, pld, draft, layer-skip, ... (default: {method})")
    p.add_argument("--draft-model", help="draft model for --method draft (HF directory or .gguf)")
    p.add_argument("--draft-head", help="--method eagle or auto: an EAGLE-3 head folder (speculators or original "
                   "layout; default: the head shipped for the embedded model); --method medusa: a Medusa head folder")
    p.add_argument("--learn", action="store_true",
                   help="--method eagle or auto: keep training the head on the text it drafts for, in the "
                        "background (online adaptation; outputs never change)")
    p.add_argument("--num-draft", type=int, default=None, help="draft tokens per step (fixes the length)")
    p.add_argument("--tree-width", type=int, default=1, help="--method draft, eagle: children per tree node")
    p.add_argument("--guard", action="store_true",
                   help="take plain steps while speculation measures slower per token (same output)")
    p.add_argument("--budget", choices=["fixed", "goodput"], default="fixed",
                   help="goodput: verify of each draft the nodes worth their rows for the whole batch, from "
                        "measured step costs and acceptance per tree position (same output)")
    p.add_argument("--exit-layer", type=int, default=None, help="--method layer-skip: layers the drafter runs")
    p.add_argument("--no-forced-tokens", dest="forced_tokens", action="store_false",
                   help="under a grammar, do not draft the tokens it forces (keys, quotes, braces) beside the "
                        "method's draft (same output; slower)")
    p.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE",
                   help="a method-specific option (repeatable), e.g. --opt datastore=DS")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='vLLM\'s form, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' (methods ngram, '
                        "eagle, eagle3, medusa, draft_model or forerun's own; `model` is the draft model or head): "
                        "in place of --method, --num-draft, --draft-model and --draft-head")


def engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(kv_cache_tokens=a.kv_cache_tokens, max_num_seqs=a.max_num_seqs,
                        max_step_tokens=a.max_step_tokens, prefix_caching=not a.no_prefix_caching,
                        max_model_len=a.max_model_len)


def spec_config(a: argparse.Namespace) -> SpecConfig:
    from forerun.drafters.registry import methods  # here: it imports torch, which --help does not need

    fields = _vllm_speculation(a, methods()) if a.speculative_config else _speculation(a, methods())
    fields["options"] = {**parse_options(a.opt, "--opt"), **fields["options"]}
    if getattr(a, "learn", False):
        if fields["method"] not in ("eagle", "auto"):
            raise ValueError("--learn goes with --method eagle or auto")
        fields["options"]["eagle.learn" if fields["method"] == "auto" else "learn"] = True
    return SpecConfig(tree_width=a.tree_width, exit_layer=a.exit_layer, guard=a.guard, budget=a.budget,
                      forced_tokens=a.forced_tokens, **fields)


def _speculation(a: argparse.Namespace, registered: list[str]) -> dict:
    """SpecConfig fields from --method, --num-draft, --draft-model and --draft-head."""
    if a.method not in registered:  # before the model loads
        raise ValueError(f"unknown method {a.method!r}; choose one of {', '.join(registered)}")
    options = {}
    if a.draft_head:
        if a.method not in ("eagle", "medusa", "auto"):
            raise ValueError("--draft-head goes with --method eagle, medusa or auto")
        options["eagle.head" if a.method == "auto" else "head"] = a.draft_head
    default = SpecConfig()
    fixed = a.num_draft is not None
    num = a.num_draft if fixed else default.num_draft
    return dict(method=a.method, num_draft=num, adaptive=not fixed, max_draft=max(num, default.max_draft),
                draft_model=a.draft_model, options=options)


def _vllm_speculation(a: argparse.Namespace, registered: list[str]) -> dict:
    from forerun.speculative_config import parse_speculative_config

    given = [flag for flag, value in (("--num-draft", a.num_draft), ("--draft-model", a.draft_model),
                                      ("--draft-head", a.draft_head)) if value is not None]
    if given:
        raise ValueError(f"--speculative-config already says what {', '.join(given)} would; give one or the other")
    return parse_speculative_config(a.speculative_config, registered)
