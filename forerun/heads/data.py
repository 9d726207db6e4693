"""Self-distillation data for a draft head: the target's own replies to training prompts, then the
target's features over each prompt and reply.

A head learns best from the features it will see at inference, so both stages run the target as it
serves (the embedded model in q4 on the CPU): replies come from the batched engine, greedy and sampled,
and the features from a teacher-forced forward of the same runtime over prompt + reply.

Prompts come from training sets only, never from data used to measure: the instruction mix
(../shared/data/train_prompts/self_instruct_mix.jsonl), GSM8K train, questions the target writes itself
(generated_prompts: it is given its chat template up to where a user's message begins, as Magpie does,
arXiv 2406.08464, so the questions read like what users ask a chat model), and code tasks over
functions of Python's own standard library (code_prompts). Both stages append to files and skip what is already there, so a stopped
run resumes where it stopped.
"""
from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from forerun.config import SamplingParams, SpecConfig
from forerun.drafters.base import Drafter, root_only
from forerun.types import Draft, Scores, Verdict

MAX_PROMPT_TOKENS = 640  # longer prompts are skipped: their features cost more than their replies teach


@dataclass(frozen=True, slots=True)
class PromptSpec:
    """Which training prompts to draw: how many from each file, and the seed of the draw."""

    instruct: str = "../shared/data/train_prompts/self_instruct_mix.jsonl"
    gsm8k: str = "../shared/data/gsm8k/train.jsonl"
    instruct_count: int = 1500
    gsm8k_count: int = 500
    generated_count: int = 0  # questions the target writes itself (generated_prompts)
    code_count: int = 0  # code tasks over standard-library functions (code_prompts)
    translate_count: int = 0  # sentences to translate into English (translation_prompts)
    seed: int = 0


def training_prompts(spec: PromptSpec, generated: list[dict] = (), documents: list[dict] = ()) -> list[dict]:
    """[{"id", "source", "text"}]: the instruction mix drawn evenly across its templates (T0's 11k
    prompts come from a few hundred templates; drawing per template keeps the mix varied), GSM8K
    train questions, code tasks, sentences to translate, `generated` (from generated_prompts) and
    `documents` (from document_prompts), shuffled together.
    Deterministic for a seed."""
    rng = random.Random(spec.seed)
    by_source: dict[str, list[dict]] = {}
    for i, line in enumerate(Path(spec.instruct).read_text().splitlines()):
        row = json.loads(line)
        by_source.setdefault(row["source"], []).append({"id": f"instruct-{i}", "source": row["source"],
                                                        "text": row["prompt"]})
    for rows in by_source.values():
        rng.shuffle(rows)
    picked: list[dict] = []
    sources = sorted(by_source)
    while len(picked) < spec.instruct_count and any(by_source.values()):
        for source in sources:  # one from each template per round
            if by_source[source] and len(picked) < spec.instruct_count:
                picked.append(by_source[source].pop())
    questions = [json.loads(line) for line in Path(spec.gsm8k).read_text().splitlines()]
    order = rng.sample(range(len(questions)), min(spec.gsm8k_count, len(questions)))
    picked += [{"id": f"gsm8k-{i}", "source": "gsm8k", "text": questions[i]["question"]} for i in order]
    picked += code_prompts(spec.code_count, spec.seed)
    picked += translation_prompts(spec.translate_count, spec.seed)
    picked += list(generated)[:spec.generated_count]
    picked += list(documents)
    rng.shuffle(picked)
    return picked


_CODE_TASKS = (
    "Explain what this Python function does, step by step:\n\n```python\n{source}\n```",
    "Write a Python function `{name}{signature}` that does the following: {summary}",
    "Rewrite this Python function so it is easier to read, and explain your changes:\n\n```python\n{source}\n```",
    "Write unit tests for this Python function:\n\n```python\n{source}\n```",
    "What does `{name}{signature}` return? Here is its code:\n\n```python\n{source}\n```",
)


def code_prompts(count: int, seed: int = 0) -> list[dict]:
    """`count` code tasks (explain, write, rewrite, test) over documented functions of 5-40 lines in
    the running Python's standard library: code the machine has offline, under a licence that allows it.
    Deterministic for a seed and a Python version."""
    if count <= 0:
        return []
    functions = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            text = path.read_text()
            tree = ast.parse(text)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if not doc or not 5 <= length <= 40:
                continue
            source = "\n".join(lines[node.lineno - 1:node.end_lineno])
            indent = len(source) - len(source.lstrip())
            source = "\n".join(line[indent:] for line in source.splitlines())
            functions.append({"name": node.name, "signature": f"({ast.unparse(node.args)})",
                              "summary": doc.strip().splitlines()[0], "source": source, "file": path.name})
    rng = random.Random(seed)
    rng.shuffle(functions)
    return [{"id": f"code-{f['file']}-{f['name']}-{i % len(_CODE_TASKS)}", "source": "code",
             "text": _CODE_TASKS[i % len(_CODE_TASKS)].format(**f)} for i, f in enumerate(functions[:count])]


_TRANSLATE_FROM = (("de", "German"), ("fr", "French"), ("es", "Spanish"))


def _mo_messages(path: Path) -> list[str]:
    """The translated messages of a gettext catalog (.mo): the first form of each, the header left out.
    A file that is not a catalog gives nothing."""
    data = path.read_bytes()
    if len(data) < 28:
        return []
    byteorder = {b"\xde\x12\x04\x95": "little", b"\x95\x04\x12\xde": "big"}.get(data[:4])
    if byteorder is None:
        return []

    def word(at: int) -> int:
        return int.from_bytes(data[at:at + 4], byteorder)

    count, table = word(8), word(16)  # messages, and where the table of their translations begins
    out = []
    for k in range(count):
        length, offset = word(table + 8 * k), word(table + 8 * k + 4)
        text = data[offset:offset + length].split(b"\0")[0]
        if text:
            try:
                out.append(text.decode("utf-8"))
            except UnicodeDecodeError:
                continue
    return out


def _is_sentence(text: str) -> bool:
    """A whole sentence of 7-40 words in running text: no format placeholders, markup or line breaks."""
    words = text.split()
    return (7 <= len(words) <= 40 and text[:1].isupper() and not any(c in text for c in "%{}<>\n\t_=|\\")
            and "--" not in text and sum(c.isalpha() or c == " " for c in text) > 0.85 * len(text))


def translation_prompts(count: int, seed: int = 0, locale_dir: str = "/usr/share/locale") -> list[dict]:
    """`count` sentences to translate into English ("Translate German to English: ..."), two in three
    German, the rest French and Spanish: messages of the gettext catalogs installed under `locale_dir`
    (programs' own translated messages, the text in other languages a machine has offline), whole
    sentences of 7-40 words. Deterministic for a seed and a machine's catalogs; fewer when the catalogs
    hold fewer."""
    if count <= 0:
        return []
    rng = random.Random(seed)
    pools = {}
    for code, _ in _TRANSLATE_FROM:
        seen = {}
        for path in sorted(Path(locale_dir).glob(f"{code}/LC_MESSAGES/*.mo")):
            try:
                messages = _mo_messages(path)
            except OSError:
                continue
            for text in messages:
                text = " ".join(text.split())
                if _is_sentence(text):
                    seen.setdefault(text, None)
        pools[code] = list(seen)
        rng.shuffle(pools[code])
    wanted = {"de": count - 2 * (count // 6), "fr": count // 6, "es": count // 6}
    out = []
    for code, name in _TRANSLATE_FROM:
        out += [{"id": f"translate-{code}-{i}", "source": "translate", "text": f"Translate {name} to English: {text}"}
                for i, text in enumerate(pools[code][:wanted[code]])]
    return out


def _prose(paragraph: str) -> bool:
    """Running prose: 25 words or more, almost all letters and punctuation (no code, tables or lists)."""
    p = paragraph.strip()
    return (len(p.split()) >= 25 and not p.startswith((">>>", "*", "-", "|", "#", "..", "+"))
            and sum(c.isalpha() or c in " .,;:'\"()-" for c in p) > 0.92 * len(p))


def passages(low: int = 700, high: int = 2200) -> list[str]:
    """Prose passages of `low`-`high` characters from the running Python's own documentation: the
    language reference's topics (pydoc_data) and the standard library's module docstrings, consecutive
    prose paragraphs of one text joined. Deterministic for a Python version."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text()))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc:
            texts.append(doc)
    out = []
    for text in texts:
        current = ""
        for paragraph in re.split(r"\n\s*\n", text):
            paragraph = " ".join(paragraph.split())
            prose = _prose(paragraph)
            if prose and len(current) + len(paragraph) <= high:
                current = f"{current} {paragraph}" if current else paragraph
                continue
            if len(current) >= low:
                out.append(current)
            current = paragraph if prose and len(paragraph) <= high else ""
        if len(current) >= low:
            out.append(current)
    return out


_ARTICLE_SUBJECTS = (
    "a city council vote on new housing", "a storm that closed schools", "a local bakery's anniversary",
    "a new species of frog found in a rainforest", "a football club's surprise win", "rising food prices",
    "a museum reopening after repairs", "a company recalling a faulty product", "a marathon in the rain",
    "a court ruling on a data leak", "a drought affecting farmers", "a new bridge opening to traffic",
    "an election result in a small town", "a hospital hiring more nurses", "a wildfire near a village",
    "a university study on sleep", "a train strike", "a music festival's record crowd",
    "a space probe reaching a comet", "a factory closing", "a charity raising money for a library",
    "a celebrity's new film", "a cyber attack on a bank", "a heat wave in Europe", "a new law on plastic bags",
    "a shipwreck found by divers", "a teenager who won a science prize", "a power outage across a city",
    "a trade agreement between two countries", "an airline cancelling flights", "a zoo welcoming a baby elephant",
    "a flood in a river valley", "a tech company's quarterly earnings", "a mayor resigning after a scandal",
    "a new vaccine trial", "a chess champion's retirement", "traffic deaths falling", "a strike by teachers",
    "a volcano erupting", "a town banning cars from its centre",
)
_SUMMARIZE = ("Summarize: {text}", "Summarize: {text}", "Summarize the following text.\n\n{text}",
              "Write a short summary of this article:\n\n{text}")


_QUESTION = re.compile(r"(What|How|Why|When|Who|Which|Where|Is|Are|Does|Do|Can|In what)\b")


def _sentences_cut(text: str) -> str:
    """`text` up to its last full sentence (all of it when it ends one)."""
    if text.endswith((".", "!", "?", "\u201d", '"')):
        return text
    end = max(text.rfind(". "), text.rfind(".\n"))
    return text[:end + 1] if end > 0 else text


def document_prompts(llm, summarize_count: int, rag_count: int, out: Path | None = None, seed: int = 0,
                     batch: int = 48) -> list[dict]:
    """Prompts over documents, the shape of summarization and retrieval-augmented QA: "Summarize:" a
    passage, and passages followed by a question one of them answers. The documents are prose of
    Python's own documentation (`passages`) and news articles the target writes itself on varied
    subjects (at T = 0.9); the questions are written by the target, asked for one question the passage
    answers. Fewer questions than asked when the target writes too few that pass. Saved to `out` (JSON
    lines, after one line with the request) and read back from there when it answered the same request
    or holds enough, so a resumed run asks the same."""
    if summarize_count <= 0 and rag_count <= 0:
        return []
    request = {"summarize": summarize_count, "rag": rag_count, "seed": seed}
    if out is not None and out.is_file():  # its first line: the request it answered
        try:
            head, *rows = [json.loads(line) for line in out.read_text().splitlines()]
            if "request" not in head:
                raise ValueError("its first line names no request")
        except ValueError as e:  # a blank or truncated file, or another one
            raise ValueError(f"{out} is not a documents file document_prompts wrote ({e}); remove it to write "
                             "new documents") from None
        summarize = [r for r in rows if r["source"] == "summarize"]
        rag = [r for r in rows if r["source"] == "rag"]
        if head.get("request") == request or (len(summarize) >= summarize_count and len(rag) >= rag_count):
            return summarize[:summarize_count] + rag[:rag_count]
    rng = random.Random(seed)
    docs = passages()
    needed = summarize_count + rag_count // 2  # a question's context may reuse a summarized passage
    round_ = 0
    if len(docs) < needed:
        asked = [llm.encode(f"Write a news article of about 250 words about {s}.") for s in _ARTICLE_SUBJECTS]
    while len(docs) < needed and round_ < 8:  # the target's articles make up the rest
        params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=360, n=4, seed=seed * 1009 + round_)
        for gen in llm.generate_batch_ids(asked, params):
            for sample in gen.samples:
                text = _sentences_cut(sample.text.strip())
                if len(text) >= 600:
                    docs.append(text)
        round_ += 1
    rng.shuffle(docs)
    rows = [{"id": f"summarize-{i}", "source": "summarize", "text": rng.choice(_SUMMARIZE).format(text=text)}
            for i, text in enumerate(docs[:summarize_count])]
    rag = []
    rest = docs[summarize_count:] + docs[:summarize_count]  # reused as context when documents run short
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=48, seed=seed)
    asked_of, k = [], 0
    while len(asked_of) < int(rag_count * 2.5) + 8 and rest:
        main = rest[k % len(rest)]
        others = [rest[(k + 1 + j) % len(rest)] for j in range(rng.randint(0, 2))]
        context = [main] + others
        while len(" ".join(context)) > 2400 and len(context) > 1:
            context.pop()
        rng.shuffle(context)
        asked_of.append((" ".join(context), main))
        k += 1
    for start in range(0, len(asked_of), batch):
        if len(rag) >= rag_count:
            break
        chunk = asked_of[start:start + batch]
        asked = [llm.encode(f"{main}\n\nAsk one specific question about a fact in the text above. Reply with the "
                            "question only.") for _, main in chunk]
        for (context, _), gen in zip(chunk, llm.generate_batch_ids(asked, params)):
            question = next((line.strip() for line in gen.text.splitlines() if line.strip().endswith("?")), "")
            question = re.sub(r"^(\**question\**\s*\d*[:.]\**\s*|\d+[.)]\s*)", "", question, flags=re.I).strip(' "*')
            if (_QUESTION.match(question) and 12 <= len(question) <= 200 and "text" not in question.lower()
                    and len(rag) < rag_count):
                rag.append({"id": f"rag-{len(rag)}", "source": "rag", "text": f"{context}\n{question}"})
    rows += rag
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in [{"request": request}] + rows))
    return rows


def generated_prompts(llm, count: int, out: Path | None = None, seed: int = 0, batch: int = 96,
                      max_new_tokens: int = 80) -> list[dict]:
    """`count` questions the target writes itself: its chat template up to where a user's message
    begins (Magpie's pre-query template), continued at T = 1 until the message ends. Questions cut off
    by the length cap, shorter than 12 characters, or repeated are dropped. Saved to `out` (JSON lines)
    and read back from there when it holds enough, so a resumed run asks the same questions."""
    if count <= 0:
        return []
    if out is not None and out.is_file():
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        if len(rows) >= count:
            return rows[:count]
    tok = llm.tokenizer
    if tok.chat_template is None:
        raise ValueError("generated prompts need a model with a chat template")
    marker = "\u2063QUESTION\u2063"
    rendered = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=False)
    prefix = tok.encode(rendered[:rendered.index(marker)], add_bos=False)
    if not prefix:
        raise ValueError("generated prompts need a chat template that marks where a user's message begins")
    batch = min(batch, llm.engine.config.max_num_seqs)
    rows, seen, round_ = [], set(), 0
    while len(rows) < count:
        params = SamplingParams(temperature=1.0, top_p=0.98, max_new_tokens=max_new_tokens, n=batch,
                                seed=seed * 100_003 + round_)
        for sample in llm.generate_batch_ids([prefix], params)[0].samples:
            text = sample.text.strip()
            key = " ".join(text.lower().split())
            if sample.finish_reason == "length" or len(text) < 12 or key in seen:
                continue
            seen.add(key)
            rows.append({"id": f"generated-{len(rows)}", "source": "generated", "text": text})
        round_ += 1
        if round_ > 4 * count // batch + 8:
            break  # the model repeats itself: take what there is
    rows = rows[:count]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


class Recorder(Drafter):
    """Drafts nothing (every step is one plain token, as `ar`) and keeps what the target computed on the
    way: at every position, the residual streams after `layers` layers (the head's input features) and,
    from the last prompt token on, the final-normed hidden state (whose logits are the training targets)
    and the target's most likely token there.
    Recording during generation costs no extra forward: the engine's own prefill and decoding rows
    carry them (Drafter.prefill_layers and layers_wanted)."""

    def __init__(self, target, layers: tuple[int, ...]):
        super().__init__(target, SpecConfig(method="ar"))
        self.prefill_layers = tuple(layers)
        self.finished: list[dict] = []

    def begin(self, seq) -> dict:
        capacity = len(seq.tokens) + seq.params.max_new_tokens + 1
        width = self.target.model.args.hidden_size
        return {"feats": torch.zeros(capacity, len(self.prefill_layers) * width, dtype=torch.float16),
                "hidden": torch.zeros(capacity, width, dtype=torch.float16),
                "argmax": torch.zeros(capacity, dtype=torch.int32), "seen": 0}

    def propose(self, seq, depth: int) -> Draft:
        return root_only(seq)

    def layers_wanted(self, seq) -> tuple[int, ...]:
        return self.prefill_layers

    def observe_prefill(self, seq, start: int, layers: dict[int, torch.Tensor]) -> None:
        state = seq.draft_state
        feats = torch.cat([layers[k] for k in self.prefill_layers], dim=-1)
        state["feats"][start:start + feats.shape[0]] = feats.to(torch.float16)
        state["seen"] = start + feats.shape[0]

    def observe(self, seq, draft: Draft, verdict: Verdict, scores: Scores) -> None:
        state = seq.draft_state
        root = len(seq.tokens) - verdict.accepted - 2  # the root's position (seq holds the new tokens)
        path = torch.tensor(verdict.path)
        rows = torch.arange(root, root + len(path))
        state["feats"][rows] = torch.cat([scores.layers[k][path] for k in self.prefill_layers], -1).to(torch.float16)
        state["hidden"][rows] = scores.hidden[path].to(torch.float16)
        state["argmax"][rows] = scores.logits[path].argmax(-1).to(torch.int32)
        state["seen"] = root + len(path)

    def end(self, seq) -> None:
        state, first = seq.draft_state, seq.prompt_len - 1
        n = state["seen"]  # positions whose features were computed: every token but the last
        self.finished.append({"request_id": seq.request_id, "prompt_len": seq.prompt_len,
                              "tokens": torch.tensor(seq.tokens[:n + 1], dtype=torch.int32),
                              "feats": state["feats"][:n].clone(), "hidden": state["hidden"][first:n].clone(),
                              "argmax": state["argmax"][first:n].clone()})


def record(llm, prompts: list[dict], out: Path, layers: tuple[int, ...], temperatures: tuple[float, ...] = (0.0, 0.7),
           max_new_tokens: int = 256, in_flight: int = 48, shard_size: int = 64, seed: int = 0,
           progress=None) -> None:
    """Answer every prompt with the target (prompt i at temperatures[i % len(temperatures)], so each
    temperature sees a share of every source), recording the features each reply was decoded with,
    into shard files under `out` of `shard_size` replies (prompts already in a shard are skipped on
    resume). `in_flight` requests decode together, a new one joining as each finishes, so the batch
    never drains. The engine must not skip prompt rows through its prefix cache."""
    if llm.engine.config.prefix_caching:
        raise ValueError("recording needs an engine without prefix caching (EngineConfig(prefix_caching=False))")
    out.mkdir(parents=True, exist_ok=True)
    done = {row["id"] for shard in sorted(out.glob("shard-*.pt")) for row in torch.load(shard)["meta"]}
    todo = []
    for i, prompt in enumerate(prompts):
        if prompt["id"] in done:
            continue
        ids = prompt["ids"] if "ids" in prompt else llm.encode(prompt["text"])
        if len(ids) <= MAX_PROMPT_TOKENS:
            temperature = temperatures[i % len(temperatures)]
            params = SamplingParams(temperature=temperature, top_p=0.95 if temperature else 1.0,
                                    max_new_tokens=max_new_tokens, seed=seed + i)
            todo.append(({"id": prompt["id"], "source": prompt["source"], "temperature": temperature}, ids, params))
    engine = llm.engine
    recorder = Recorder(llm.runtime, layers)
    spec = SpecConfig(method="ar")
    engine.use_drafter(spec, recorder)
    shard = len(list(out.glob("shard-*.pt")))
    meta_of, pending, queue = {}, [], list(reversed(todo))
    t0, tokens = time.perf_counter(), 0
    while queue or engine.has_unfinished() or pending:
        while queue and len(engine.requests) < in_flight:
            meta, ids, params = queue.pop()
            meta_of[engine.add_request(ids, params, spec)] = meta
        if engine.has_unfinished():
            engine.step()
        for rec in recorder.finished:
            rec["meta"] = meta_of.pop(rec.pop("request_id"))
            tokens += len(rec["tokens"]) - rec["prompt_len"]
            pending.append(rec)
        recorder.finished.clear()
        if len(pending) >= shard_size or (pending and not queue and not engine.has_unfinished()):
            batch, pending = pending[:shard_size], pending[shard_size:]
            path = out / f"shard-{shard:04d}.pt"
            torch.save({"meta": [r.pop("meta") for r in batch], "records": batch, "layers": list(layers)},
                       path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
            shard += 1
            if progress is not None:
                progress(len(batch), tokens, time.perf_counter() - t0)
            t0, tokens = time.perf_counter(), 0


def load_shards(folder: Path) -> tuple[list[dict], list[dict]]:
    """Every recorded reply (meta, record) in shard order."""
    meta, records = [], []
    for shard in sorted(folder.glob("shard-*.pt")):
        data = torch.load(shard)
        meta += data["meta"]
        records += data["records"]
    return meta, records
