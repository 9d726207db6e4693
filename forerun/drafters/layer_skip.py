"""Self-speculative drafting: the target's first k layers, then its own final norm and head.

The drafter shares the target's weights and the sequence's KV blocks. Its layer-0..k-1 entries for
the draft tokens land at the very slots that verification then overwrites with the full model's, so
nothing needs undoing. Without early-exit training the shallow exit agrees with the full model only on easy
tokens; the adaptive length keeps drafts short when it does not.
"""
from __future__ import annotations

import torch

from forerun.drafters.base import Drafter, Sequence, chain
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

    def propose(self, seq: Sequence, depth: int) -> Draft:
        return draft_chain(self.target.model, seq, self.exit_layer, depth)


def draft_chain(model, seq: Sequence, exit_layer: int, length: int) -> Draft:
    """A chain of `length` tokens, each from the first `exit_layer` layers then the final norm and
    head, written at the sequence's own slots from seq.cached on (the engine reserved them)."""
    tokens, qs = [seq.root], []
    for i in range(length):
        position = seq.cached + i
        row = Segment(torch.tensor([tokens[-1]]), torch.tensor([position]), seq.slots(0, position + 1))
        logits = model(ForwardBatch.pack([row]), seq.kv, num_layers=exit_layer).logits[0]
        token, q = draw(logits, seq.params, seq.generator)
        tokens.append(token)
        qs.append(q)
    q = None if seq.params.greedy or not qs else torch.stack([torch.zeros_like(qs[0]), *qs]).cpu()
    return chain(seq, tokens[1:], q)
