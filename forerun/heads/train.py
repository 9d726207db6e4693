"""Training an EAGLE-3 head on recorded target features (forerun.heads.data), on the CPU.

The loss is the cross-entropy of the head's draft-vocabulary distribution against the target's own
distribution restricted to the draft vocabulary (the target's head rows for those tokens only, never a
vocabulary-wide softmax), at positions where the target's most likely token lies in the draft vocabulary
(elsewhere no draft can be right). Every batch is unrolled for `unroll` drafting steps, the head feeding
on its own hidden states (training-time test, as EAGLE-3 and HASS do), and each step's loss counts.

Held-back replies give the learning curve: at each evaluation, the share of positions where the head's
first draft equals the target's choice, and for k > 1 the share where drafts 1..k all do (what a chain of
k drafts accepts greedily).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from forerun.heads.eagle3 import Eagle3Config, Eagle3Head, save_head
from forerun.models import quant


@dataclass(frozen=True)
class TrainConfig:
    draft_vocab: int = 8192  # tokens the head can draft (the most frequent in the recorded replies)
    unroll: int = 3  # drafting steps per training row (training-time test)
    epochs: float = 3.0
    lr: float = 1e-3
    warmup: int = 30  # steps of linear warm-up, then cosine decay to lr / 20
    batch_tokens: int = 1024  # rows per batch (padding included): many small steps learn faster than few big ones
    prompt_context: int = 96  # prompt rows kept before each reply (its keys; the rest cost without teaching)
    heldout: float = 0.05  # share of replies held back for the learning curve
    eval_every: int = 200  # steps between evaluations
    checkpoint_every: int = 100
    seed: int = 0
    threads: int = 0  # torch threads (0: leave as is)
    # the residual around the head's attention starts from norm(hidden) (speculators' option; vLLM's
    # default): the target's residual streams carry outliers of 1e4, which fc passes on unnormalised
    norm_before_residual: bool = True


def vocabulary(records: list[dict], size: int) -> tuple[torch.Tensor, dict[int, float]]:
    """The `size` target tokens the target most often chooses in the replies (its argmax at every reply
    position, i.e. what a draft must guess), and the share of positions each vocabulary size covers."""
    counts = Counter()
    for rec in records:
        counts.update(rec["argmax"].tolist())
    total = sum(counts.values())
    ranked = [t for t, _ in counts.most_common()]
    coverage = {}
    for k in (1024, 2048, 4096, 8192, 16384, 32768):
        coverage[k] = sum(counts[t] for t in ranked[:k]) / total
    coverage[size] = sum(counts[t] for t in ranked[:size]) / total
    chosen = ranked[:size]
    if len(chosen) < size:  # a small corpus: fill with the lowest unused ids
        used = set(chosen)
        chosen += [t for t in range(size * 2) if t not in used][:size - len(chosen)]
    return torch.tensor(sorted(chosen)), coverage


@dataclass
class Example:
    features: torch.Tensor  # [T, F] float16
    tokens: torch.Tensor  # [T] x_{i+1} for each row i
    positions: torch.Tensor  # [T]
    hidden: torch.Tensor  # [T, D] float16: the target's final hidden state at position i + 1 (zeros before the reply)
    label: torch.Tensor  # [T] the draft id of the target's choice at position i + 1, -1 where no draft can be right


def examples(records: list[dict], t2d: torch.Tensor, context: int) -> list[Example]:
    """One training row per position from `context` prompt rows before the reply on; row i's step-k
    target sits at row i + k (the row shifted k on), so the labels of row i describe position i + 1."""
    draft_of = torch.full((t2d.shape[0],), -1, dtype=torch.long)
    draft_of[t2d.nonzero()[:, 0]] = torch.arange(int(t2d.sum()))
    out = []
    for rec in records:
        first, n = rec["prompt_len"] - 1, rec["feats"].shape[0]  # the first reply row's position; positions with features
        if first < 1 or n - first < 2:
            continue
        s = max(0, first - context)
        hidden = torch.zeros(n - s, rec["hidden"].shape[1], dtype=torch.float16)
        label = torch.full((n - s,), -1, dtype=torch.long)
        # row i (position i) is scored against position i + 1's target; positions first..n-1 have one
        hidden[first - 1 - s:n - 1 - s] = rec["hidden"]
        label[first - 1 - s:n - 1 - s] = draft_of[rec["argmax"].long()]
        out.append(Example(rec["feats"][s:n], rec["tokens"][s + 1:n + 1].long(), torch.arange(s, n), hidden, label))
    return out


def batches(items: list[Example], batch_tokens: int, rng: random.Random) -> list[list[Example]]:
    """Examples of similar length together, at most batch_tokens rows (padding included) per batch."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].tokens))
    out, current = [], []
    for i in order:
        longest = max([len(items[j].tokens) for j in current] + [len(items[i].tokens)])
        if current and longest * (len(current) + 1) > batch_tokens:
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    rng.shuffle(out)
    return [[items[i] for i in b] for b in out]


def feature_scale(items: list[Example], rows: int = 50_000) -> torch.Tensor:
    """[F] each feature's root mean square over (up to) `rows` training rows. The target's residual
    streams differ in scale by four orders of magnitude between dimensions (a few carry values near
    1e4), so an optimizer step on fc's weights would move the output by very different amounts per
    dimension; training feeds fc the features divided by this, and the saved fc folds it back in."""
    sample = torch.cat([e.features for e in items])[:rows].float()
    return sample.pow(2).mean(0).sqrt().clamp(min=1e-3)


def collate(batch: list[Example], unroll: int, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    T = max(len(e.tokens) for e in batch)
    B, F_, D = len(batch), batch[0].features.shape[1], batch[0].hidden.shape[1]
    out = {"features": torch.zeros(B, T, F_), "tokens": torch.zeros(B, T + unroll, dtype=torch.long),
           "positions": torch.zeros(B, T, dtype=torch.long), "valid": torch.zeros(B, T, dtype=torch.bool),
           "hidden": torch.zeros(B, T + unroll, D), "label": torch.full((B, T + unroll), -1, dtype=torch.long)}
    for b, e in enumerate(batch):
        n = len(e.tokens)
        out["features"][b, :n] = e.features.float() if scale is None else e.features.float() / scale
        out["tokens"][b, :n] = e.tokens
        out["positions"][b, :n] = e.positions
        out["valid"][b, :n] = True
        out["hidden"][b, :n] = e.hidden.float()
        out["label"][b, :n] = e.label
    return out


def losses(head: Eagle3Head, target_rows: torch.Tensor, batch: dict[str, torch.Tensor], unroll: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, hits [unroll], counted [unroll]): hits[k] counts rows whose drafts 1..k+1 all match the
    target's choice, among the rows where step k has a label."""
    T = batch["features"].shape[1]
    label = batch["label"]
    scored = torch.zeros_like(batch["valid"])  # rows with a label at some step: the others only lend keys
    for k in range(unroll):
        scored |= label[:, k:k + T] >= 0
    outputs, index, index_valid = head.unrolled(batch["features"], batch["tokens"], batch["positions"],
                                                batch["valid"], unroll, active=scored)
    with torch.no_grad():  # the target's distribution at every labelled position, once (steps share them)
        labelled = label >= 0
        slot = torch.full(label.shape, -1, dtype=torch.long)
        slot[labelled] = torch.arange(int(labelled.sum()))
        targets = torch.softmax(batch["hidden"][labelled] @ target_rows.T, dim=-1)
    loss = torch.zeros(())
    hits, counted = torch.zeros(unroll), torch.zeros(unroll)
    all_right = torch.ones_like(index_valid)
    for k, out in enumerate(outputs):
        lab = torch.gather(label, 1, index + k)
        mask = (lab >= 0) & index_valid
        if not bool(mask.any()):
            continue
        target = targets[torch.gather(slot, 1, index + k)[mask]]
        logits = head.logits(out[mask])  # the labelled rows only: the head's output layer is most of its cost
        logp = torch.log_softmax(logits, dim=-1)
        loss = loss + -(target * logp).sum(-1).mean()
        with torch.no_grad():
            right = torch.zeros_like(mask)
            right[mask] = logits.argmax(-1) == lab[mask]
            all_right = all_right & (right | ~mask)
            hits[k] = (all_right & mask).sum()
            counted[k] = mask.sum()
    return loss, hits, counted


def new_head(target, aux_layers: tuple[int, ...], draft_ids: torch.Tensor, verifier: str | None,
             seed: int, norm_before_residual: bool = True) -> tuple[Eagle3Head, torch.Tensor]:
    """A fresh head for the target and the target's output rows for the draft vocabulary (the training
    targets' head, and the head's lm_head to start from)."""
    torch.manual_seed(seed)
    model = target.model
    config = Eagle3Config.for_target(model.args, aux_layers, len(draft_ids), verifier, norm_before_residual)
    head = Eagle3Head(config, model.embed.detach().float())
    head.set_vocabulary(draft_ids)
    rows = target_rows(target, draft_ids)
    with torch.no_grad():  # the head's output starts as the target's own: its final norm and head rows
        head.lm_head.weight.copy_(rows)
        head.norm.weight.copy_(model.norm.weight.detach().float())
    return head, rows


def target_rows(target, draft_ids: torch.Tensor) -> torch.Tensor:
    """[V_draft, D] the target's output rows for the draft vocabulary: its logits there are these
    rows times its final-normed hidden state."""
    head = target.model.head
    weight = head.weight if head.quant is None else quant.dequantize(head.quant)
    return weight.detach().float()[draft_ids.to(weight.device)].cpu().clone()


def evaluate(head, target_rows, held: list[Example], config: TrainConfig, scale: torch.Tensor | None = None) -> list[float]:
    hits, counted = torch.zeros(config.unroll), torch.zeros(config.unroll)
    with torch.no_grad():
        for batch in batches(held, config.batch_tokens, random.Random(0)):
            _, h, c = losses(head, target_rows, collate(batch, config.unroll, scale), config.unroll)
            hits += h
            counted += c
    return (hits / counted.clamp(min=1)).tolist()


def split(count: int, config: TrainConfig) -> tuple[list[int], list[int]]:
    """(held-back, training) indices of `count` records: a share `config.heldout` drawn by the seed."""
    ids = list(range(count))
    random.Random(config.seed).shuffle(ids)
    n_held = max(1, int(count * config.heldout))
    return sorted(ids[:n_held]), sorted(ids[n_held:])


def train(target, records: list[dict], out: Path, aux_layers: tuple[int, ...], config: TrainConfig,
          verifier: str | None = None, init: Eagle3Head | None = None, log=print) -> Eagle3Head:
    """Train a head on `records` into `out` (checkpoint.pt while it runs, resumed from if present; head/
    with config.json and model.safetensors, curve.json and curve.png at the end). init: a head to start
    from (its vocabulary and layers are kept) instead of a fresh one."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    held_ids, train_ids = split(len(records), config)
    draft_ids, coverage = vocabulary([records[i] for i in train_ids], config.draft_vocab)
    log(f"draft vocabulary {config.draft_vocab}: covers {coverage[config.draft_vocab]:.1%} of the target's choices "
        f"in the replies (" + ", ".join(f"{k}: {v:.1%}" for k, v in sorted(coverage.items())) + ")")
    if init is not None:
        draft_ids, aux_layers = init.draft_ids.clone(), init.config.aux_layers
    head, target_rows = new_head(target, aux_layers, draft_ids, verifier, config.seed, config.norm_before_residual)
    train_set = examples([records[i] for i in train_ids], head.t2d, config.prompt_context)
    held = examples([records[i] for i in held_ids], head.t2d, config.prompt_context)
    scale = feature_scale(train_set)
    if init is not None:
        head.load_state_dict(init.state_dict())
        with torch.no_grad():
            head.fc.weight.mul_(scale)  # unfold: training feeds fc scaled features
        log("starting from the given head")
    per_epoch = len(batches(train_set, config.batch_tokens, random.Random(0)))
    total = max(1, int(per_epoch * config.epochs))
    trained_tokens = sum(int((e.label >= 0).sum()) for e in train_set)
    log(f"{len(train_set)} replies for training ({trained_tokens} labelled positions), {len(held)} held back; "
        f"{per_epoch} batches an epoch, {total} steps")
    params = [p for name, p in head.named_parameters() if name != "lm_head.weight"]
    head.lm_head.weight.requires_grad_(False)  # the target's rows, kept (as speculators keeps them)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.warmup, total))
    step, curve, tokens_seen = 0, [], 0
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["config"] != asdict(config) or state["records"] != len(records):
            raise ValueError(f"{checkpoint} comes from another configuration or data; remove it to start afresh")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, curve, tokens_seen = state["step"], state["curve"], state["tokens_seen"]
        log(f"resumed at step {step} of {total}")
    if not curve:
        curve.append({"step": 0, "tokens": 0, "acceptance": evaluate(head, target_rows, held, config, scale)})
    t0, window = time.perf_counter(), []
    while step < total:
        epoch, index = divmod(step, per_epoch)
        order = batches(train_set, config.batch_tokens, random.Random(config.seed * 1000 + epoch))
        batch = collate(order[index], config.unroll, scale)
        loss, hits, counted = losses(head, target_rows, batch, config.unroll)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        tokens_seen += int(counted[0])
        window.append((loss.item(), (hits / counted.clamp(min=1)).tolist()))
        if step % 10 == 0 or step == total:
            rate = tokens_seen and step / (time.perf_counter() - t0)
            recent = window[-50:]
            acc = [sum(w[1][k] for w in recent) / len(recent) for k in range(config.unroll)]
            _progress(step, total, sum(w[0] for w in recent) / len(recent), acc, rate)
        if step % config.eval_every == 0 or step == total:
            curve.append({"step": step, "tokens": tokens_seen, "acceptance": evaluate(head, target_rows, held, config, scale)})
            log(f"\nheld-back acceptance at {tokens_seen} tokens: " +
                " ".join(f"{a:.3f}" for a in curve[-1]["acceptance"]))
        if step % config.checkpoint_every == 0 or step == total:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"config": asdict(config), "records": len(records), "head": head.state_dict(),
                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "step": step,
                        "curve": curve, "tokens_seen": tokens_seen}, tmp)
            tmp.replace(checkpoint)
    with torch.no_grad():
        head.fc.weight.div_(scale)  # fold the feature scale in: the saved head reads the target's raw features
    save_head(head, out / "head")
    (out / "curve.json").write_text(json.dumps({"coverage": coverage, "curve": curve, "config": asdict(config)},
                                               indent=1) + "\n")
    plot_curve(curve, out / "curve.png")
    return head


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _progress(step: int, total: int, loss: float, acc: list[float], rate: float) -> None:
    width = 30
    done = int(width * step / total)
    eta = (total - step) / rate if rate else 0
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} loss {loss:.3f} "
                     f"accept {' '.join(f'{a:.2f}' for a in acc)}  {rate:.2f} steps/s, {eta / 60:.0f} min left ")
    sys.stderr.flush()


def plot_curve(curve: list[dict], path: Path) -> None:
    from forerun.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in range(len(curve[0]["acceptance"])):
        ax.plot([c["tokens"] for c in curve], [c["acceptance"][k] for c in curve], marker="o",
                label=f"drafts 1..{k + 1} all right" if k else "first draft right")
    ax.set_title("Draft head: acceptance on held-back replies (teacher forced)")
    ax.set_xlabel("positions trained on")
    ax.set_ylabel("share of held-back positions")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
