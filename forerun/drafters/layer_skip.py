"""Self-speculative drafting: the target's first k layers, then its own final norm and head.

The drafter shares the target's weights and the sequence's KV blocks. Its layer-0..k-1 entries for
the draft tokens land at the very slots that verification then overwrites with the full model's, so
nothing needs undoing. Without early-exit training the shallow exit agrees with the full model only on easy
tokens; the adaptive length keeps drafts short when it does not. A step drafts for all its sequences
together: one shallow forward per depth, over every sequence still drafting at that depth.
"""
from __future__ import annotations

import torch

from forerun.drafters.base import Drafter, SequenceView, chain
from forerun.drafters.registry import register
from forerun.models.batch import ForwardBatch, Segment
from forerun.sampling import draw
from forerun.types import Draft


@register("layer-skip")
class LayerSkip(Drafter):
    drafts_with_model = writes_target_kv = True

    def __init__(self, target, spec):
        super().__init__(target, spec)
        layers = target.model.args.num_layers
        self.exit_layer = spec.exit_layer or max(1, layers // 2)
        if self.exit_layer >= layers:
            raise ValueError(f"exit_layer must be below the model's {layers} layers, got {self.exit_layer}")

    def propose_batch(self, seqs: list[SequenceView], depths: list[int]) -> list[Draft]:
        return draft_chains(self.target.model, seqs, self.exit_layer, depths)

    def propose(self, seq: SequenceView, depth: int) -> Draft:
        return self.propose_batch([seq], [depth])[0]


def draft_chains(model, seqs: list[SequenceView], exit_layer: int, lengths: list[int]) -> list[Draft]:
    """For each sequence a chain of lengths[b] tokens, each from the first `exit_layer` layers then
    the final norm and head, written at the sequence's own slots from seq.cached on (the engine
    reserved them). Depth d is one forward over every sequence drafting at least d + 1 tokens; each
    row is computed as it would be alone, and sampled with its own sequence's generator."""
    tokens = [[seq.root] for seq in seqs]
    qs: list[list[torch.Tensor]] = [[] for _ in seqs]
    for d in range(max(lengths, default=0)):
        live = [b for b, length in enumerate(lengths) if length > d]
        rows = [Segment(torch.tensor([tokens[b][-1]]), torch.tensor([seqs[b].cached + d]),
                        seqs[b].slots(0, seqs[b].cached + d + 1)) for b in live]
        logits = model(ForwardBatch.pack(rows), seqs[live[0]].kv, num_layers=exit_layer).logits  # [len(live), V]
        best = logits.argmax(dim=-1).tolist()  # the greedy sequences' tokens, in one call
        for b, row, top in zip(live, logits, best):
            params = seqs[b].params
            token, q = (top, None) if params.greedy else draw(row, params, seqs[b].generator)
            tokens[b].append(token)
            qs[b].append(q)
    return [chain(seq, t[1:], None if seq.params.greedy or not q else torch.stack([torch.zeros_like(q[0]), *q]).cpu())
            for seq, t, q in zip(seqs, tokens, qs)]
