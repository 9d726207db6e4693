"""Training Medusa heads on recorded target replies (forerun.heads.data), on the CPU.

Medusa-1: the target stays frozen, so a training row is one reply position t and its input is the
target's final-normed hidden state h_t, recorded once (records' `hidden`). Head k is trained towards
what the target does k positions later: its distribution at position t + k (h_{t+k} through the
target's LM head rows for the draft vocabulary only, a softmax over those rows, never over the whole
vocabulary), the token x_{t+k+1} that head k drafts. Positions past the end of the reply have no target,
and positions whose target argmax lies outside the draft vocabulary are masked (no draft can be right
there). Head k's loss is weighted decay^(k-1), as Medusa weights far heads less.

Every head starts as Medusa starts one: its blocks at zero (the identity) and its output projection the
target's LM head rows, so head 1 begins by repeating the target's choice at t, and all heads and their
projections train (AdamW, linear warm-up, cosine decay).

Held-back replies give the learning curve: at each evaluation, the share of positions where heads 1..k
all name the target's choices (what a chain of k drafts accepts greedily, teacher forced), which
forerun.heads.train.plot_curve draws as it does an EAGLE head's.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from forerun.heads.medusa import MedusaHead, new_head, save_head, target_rows
from forerun.heads.train import plot_curve, vocabulary

BEYOND = -2  # label of a head whose target position lies past the end of the reply (not counted)
OUTSIDE = -1  # label of a target choice outside the draft vocabulary (counted, never right)


@dataclass(frozen=True)
class MedusaTrainConfig:
    heads: int = 4  # K: head k drafts the token k + 1 positions past its hidden state's
    layers: int = 1  # residual blocks per head
    draft_vocab: int = 8192  # tokens the heads can draft (the most frequent target choices in the replies)
    epochs: float = 3.0
    lr: float = 1e-3
    warmup: int = 30  # steps of linear warm-up, then cosine decay to lr / 20
    batch_rows: int = 512  # reply positions per step
    decay: float = 0.8  # head k's loss weight is decay ** (k - 1)
    heldout: float = 0.05  # share of replies held back for the learning curve
    eval_every: int = 200  # steps between evaluations
    checkpoint_every: int = 100
    seed: int = 0
    threads: int = 0  # torch threads (0: leave as is)


@dataclass(frozen=True)
class Rows:
    """Training rows: one per reply position, in reply order (a row's target k positions on is row + k)."""

    hidden: Tensor  # [N, D] float16: the target's final-normed hidden state at the position
    label: Tensor  # [N, K] long: head k's target as a draft id (OUTSIDE, BEYOND)


def rows_of(records: list[dict], draft_ids: Tensor, vocab_size: int, heads: int) -> Rows:
    draft_of = torch.full((vocab_size,), OUTSIDE, dtype=torch.long)
    draft_of[draft_ids] = torch.arange(len(draft_ids))
    hidden, labels = [], []
    for rec in records:
        n = rec["hidden"].shape[0]
        choice = draft_of[rec["argmax"].long()]
        label = torch.full((n, heads), BEYOND, dtype=torch.long)
        for k in range(1, min(heads, n - 1) + 1):
            label[:n - k, k - 1] = choice[k:]
        hidden.append(rec["hidden"])
        labels.append(label)
    return Rows(torch.cat(hidden), torch.cat(labels))


def losses(head: MedusaHead, rows: Rows, index: Tensor, target: Tensor, decay: float
           ) -> tuple[Tensor, Tensor, Tensor]:
    """(weighted loss, hits [K], counted [K]) over the rows `index`; target [V_draft, D] the target's LM
    head rows. hits[k] counts the rows where heads 1..k+1 all name the target's choices."""
    K = head.config.num_heads
    logp = torch.log_softmax(head(rows.hidden[index].float()), dim=-1)  # [K, B, V_draft]
    label = rows.label[index]
    loss = torch.zeros(())
    hits, counted = torch.zeros(K), torch.zeros(K)
    all_right = torch.ones(len(index), dtype=torch.bool)
    for k in range(K):
        scored = label[:, k] >= 0
        if bool(scored.any()):
            with torch.no_grad():  # the target's distribution at the position head k + 1 drafts for
                soft = torch.softmax(rows.hidden[index[scored] + k + 1].float() @ target.T, dim=-1)
            loss = loss + decay ** k * -(soft * logp[k][scored]).sum(-1).mean()
        with torch.no_grad():
            all_right &= logp[k].argmax(-1) == label[:, k]
            present = label[:, k] != BEYOND
            hits[k], counted[k] = (all_right & present).sum(), present.sum()
    return loss, hits, counted


def evaluate(head: MedusaHead, rows: Rows, target: Tensor, config: MedusaTrainConfig) -> list[float]:
    hits, counted = torch.zeros(config.heads), torch.zeros(config.heads)
    with torch.no_grad():
        for start in range(0, len(rows.label), config.batch_rows):
            index = torch.arange(start, min(start + config.batch_rows, len(rows.label)))
            _, h, c = losses(head, rows, index, target, config.decay)
            hits += h
            counted += c
    return (hits / counted.clamp(min=1)).tolist()


def train_medusa(target, records: list[dict], out: Path, config: MedusaTrainConfig, verifier: str | None = None,
                 log=print, steps: int | None = None, progress: bool = True) -> MedusaHead:
    """Train Medusa heads on `records` into `out`: checkpoint.pt while it runs (resumed from if present),
    then head/ (vLLM's Medusa layout), curve.json and curve.png. steps: stop after this many steps
    of this call, checkpointed (a later call resumes the run)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    train_records, held_records = split(records, config.heldout, config.seed)
    draft_ids, coverage = vocabulary(train_records, config.draft_vocab)
    log(f"draft vocabulary {config.draft_vocab}: covers {coverage[config.draft_vocab]:.1%} of the target's choices "
        "in the replies")
    torch.manual_seed(config.seed)
    head = new_head(target, config.heads, draft_ids, config.layers, verifier)
    vocab = target.model.args.vocab_size
    train_rows = rows_of(train_records, head.draft_ids, vocab, config.heads)
    held = rows_of(held_records, head.draft_ids, vocab, config.heads)
    rows = target_rows(target, head.draft_ids)
    per_epoch = max(1, -(-len(train_rows.label) // config.batch_rows))
    total = max(1, int(per_epoch * config.epochs))
    log(f"{len(train_records)} replies for training ({len(train_rows.label)} positions), {len(held_records)} held "
        f"back; {per_epoch} batches an epoch, {total} steps")
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = warmup_cosine(optimizer, config.warmup, total)
    checkpoint, parts = out / "checkpoint.pt", {"head": head, "optimizer": optimizer, "schedule": schedule}
    fingerprint = {"config": asdict(config), "records": len(records)}
    run = resume(checkpoint, fingerprint, parts) or {"step": 0, "curve": [], "positions": 0}
    step, curve, positions = run["step"], run["curve"], run["positions"]
    if step:
        log(f"resumed at step {step} of {total}")
    if not curve:
        curve.append({"step": 0, "tokens": 0, "acceptance": evaluate(head, held, rows, config)})
    stop = total if steps is None else min(total, step + steps)
    bar, shuffled = _bar(total, step, progress), (-1, None)
    while step < stop:
        epoch, i = divmod(step, per_epoch)
        if shuffled[0] != epoch:  # each epoch's order from its seed alone, so a resumed run draws the same
            generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
            shuffled = (epoch, torch.randperm(len(train_rows.label), generator=generator))
        order = shuffled[1]
        loss, hits, counted = losses(head, train_rows, order[i * config.batch_rows:(i + 1) * config.batch_rows], rows,
                                     config.decay)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        positions += int(counted[0])
        bar.update(1)
        bar.set_postfix_str(f"loss {loss.item():.3f} accept " +
                            " ".join(f"{h / max(c, 1):.2f}" for h, c in zip(hits.tolist(), counted.tolist())))
        if step % config.eval_every == 0 or step == total:
            curve.append({"step": step, "tokens": positions, "acceptance": evaluate(head, held, rows, config)})
            acceptance = curve[-1]["acceptance"]
            log(f"\nheld-back acceptance at {positions} positions: " + " ".join(f"{a:.3f}" for a in acceptance) +
                f" (a chain of {config.heads}: {1 + sum(acceptance):.2f} tokens a step, teacher forced)")
        if step % config.checkpoint_every == 0 or step == stop:
            save_run(checkpoint, {"fingerprint": fingerprint, "step": step, "curve": curve, "positions": positions},
                     parts)
    bar.close()
    if step == total:
        save_head(head, out / "head")
        (out / "curve.json").write_text(json.dumps({"coverage": coverage, "curve": curve, "config": asdict(config)},
                                                   indent=1) + "\n")
        plot_curve(curve, out / "curve.png")
    return head


def split(records: list[dict], heldout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training, held back): a `heldout` share of the replies, at least one, drawn by `seed`; both in
    their order in `records`."""
    ids = list(range(len(records)))
    random.Random(seed).shuffle(ids)
    n_held = max(1, int(len(ids) * heldout))
    return [records[i] for i in sorted(ids[n_held:])], [records[i] for i in sorted(ids[:n_held])]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate rising linearly over `warmup` steps, then falling along a cosine to a
    twentieth by step `total`."""
    warmup = max(1, min(warmup, total - 1))
    lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=lr / 20),
    ], milestones=[warmup])


def save_run(path: Path, run: dict, parts: dict) -> None:
    """A training run's plain values and each part's state_dict (model, optimizer, schedule), written
    whole or not at all."""
    tmp = path.with_suffix(".tmp")
    torch.save({**run, **{name: part.state_dict() for name, part in parts.items()}}, tmp)
    tmp.replace(path)


def resume(path: Path, fingerprint: dict, parts: dict) -> dict | None:
    """The plain values of the run saved at `path` with its parts' states loaded back into `parts`, or
    None where nothing was saved. A run saved with another fingerprint (configuration, data) is refused."""
    if not path.exists():
        return None
    saved = torch.load(path, weights_only=False)
    if saved.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} comes from another configuration or data; remove it to start afresh")
    for name, part in parts.items():
        part.load_state_dict(saved.pop(name))
    return saved


def _bar(total: int, done: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="medusa", unit="step", disable=not enabled, file=sys.stderr,
                leave=False)
