"""`forerun datastore build FILES... --out DIR [--model M]`: index a corpus for --method retrieval/rasd."""
from __future__ import annotations

import argparse
import sys
import time


def add_datastore_parser(subparsers) -> None:
    ds = subparsers.add_parser("datastore", help="build a retrieval datastore for --method retrieval/rasd")
    actions = ds.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="tokenize a corpus and index it with a suffix array")
    build.add_argument("files", nargs="+", help="text files (one document each) or .jsonl (one per line)")
    build.add_argument("--out", required=True, help="directory to write the datastore to")
    build.add_argument("--model", help="model whose tokenizer to use (default: the embedded SmolLM2-135M-Instruct)")
    build.set_defaults(func=cmd_datastore_build)


def cmd_datastore_build(a: argparse.Namespace) -> int:
    from forerun.models.embedded import resolve_model_dir
    from forerun.models.tokenizer import Tokenizer
    from forerun.retrieval.datastore import build, read_documents

    tokenizer = Tokenizer.from_dir(resolve_model_dir(a.model))  # the tokenizer alone: no weights
    start = time.perf_counter()
    docs = (tokenizer.encode(text, add_bos=False) for text in read_documents(a.files))
    store = build(docs, tokenizer.fingerprint(), model=a.model or "embedded SmolLM2-135M-Instruct",
                  sources=[str(f) for f in a.files])
    store.save(a.out)
    print(f"datastore {a.out}: {store.meta['documents']} documents, {store.tokens.size} tokens, "
          f"tokenizer {store.fingerprint}, {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0
