"""Medusa: K trained heads on the target's last hidden state draft K tokens at once (forerun.heads.medusa).

After each verification the target's final-normed hidden state at the last accepted node arrives in
Scores.hidden: it is h_{p-1}, whose own LM head chose the next root x_p, so head k scores x_{p+k}, the
token k places below the root. A request's first step drafts nothing: it computes the prompt and
verifies the root in one forward, so before it no hidden state of the request exists (the prompt's
rows could be had through Drafter.observe_prefill, but only after that same forward, by when the root
has moved on); its root's row gives the second step what it needs.

A step runs every head on one row per sequence, for all the drafter's sequences at once
(propose_batch), and builds each sequence's tree from the heads' top candidates, Medusa's tree:

- chain (tree_width 1): the most likely token of heads 1, 2, ... in turn;
- tree (tree_width > 1): every node at depth d has the same children, head d's `topk` best tokens
  (`topk` 0: tree_width of them), and of that Cartesian product the `nodes` most probable paths are
  kept, a path's probability being the product of its tokens' probabilities under their heads
  (grown best-first: forerun.drafters.tree_shape.grow_shape).

Each node is chosen deterministically from the heads' outputs, so the verifier treats it as a point
mass (Draft.q None): exact at any temperature. As in eagle, a node is drafted only if its path's
probability times the calibration factor (how often the heads' confident drafts were accepted, a
running mean over recent steps) reaches `min_accept`, and heads past the depth no sequence reaches are
not run. The rule reads only the heads' numbers and past outcomes, never this step's target.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from forerun.drafters.base import Drafter, Sequence, root_only
from forerun.drafters.eagle import Calibration
from forerun.drafters.registry import register
from forerun.drafters.tree_shape import grow_shape
from forerun.heads.medusa import MedusaHead, load_head
from forerun.tree import Tree
from forerun.types import Draft, Scores, Verdict


@dataclass(frozen=True, slots=True)
class MedusaOptions:
    head: str = ""  # head folder (vLLM or FasterDecoding Medusa layout); none ships, so it must be given
    topk: int = 0  # tree: candidates per head (0: tree_width)
    nodes: int = 16  # tree: nodes kept below the root
    weights: str = "q8"  # how the heads run on the CPU: q8 blocks (fastest) or float32
    min_accept: float = 0.2  # draft a node only if the target is expected to accept it this often (0: always)


@dataclass(eq=False)
class MedusaState:
    hidden: torch.Tensor | None = None  # [D] the target's final-normed hidden state at `position`
    position: int = -1
    confidence: list[float] | None = None  # the heads' confidence in each node of the last draft (root first)
    drafted: Draft | None = None  # that draft: its confidences are checked only if it is the one verified


_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # target model -> {folder: its head}


def _head(path: str, target) -> MedusaHead:
    """The head in `path` for `target`, read once for every SpecConfig that names it (a server builds
    one drafter per configuration); dropped with the target model."""
    if not path or not (Path(path) / "config.json").is_file():
        raise ValueError(f"medusa: no head at {path or '(none given)'} (give head=PATH: a vLLM or FasterDecoding "
                         "Medusa folder, or train one with forerun train-head --kind medusa)")
    heads = _LOADED.setdefault(target.model, {})
    folder = str(Path(path).resolve())
    if folder not in heads:
        heads[folder] = load_head(folder, target)
    return heads[folder]


@register("medusa")
class Medusa(Drafter):
    drafts_with_model = True

    def __init__(self, target, spec, head: MedusaHead | None = None):
        super().__init__(target, spec)
        self.opts = MedusaOptions(**spec.option_values({f.name: f.default for f in fields(MedusaOptions)}))
        if self.opts.nodes < 1 or self.opts.topk < 0:
            raise ValueError(f"medusa: nodes must be >= 1 and topk >= 0, got {self.opts.nodes} and {self.opts.topk}")
        if not 0.0 <= self.opts.min_accept < 1.0:
            raise ValueError(f"medusa: min_accept must be in [0, 1), got {self.opts.min_accept}")
        if self.opts.weights not in ("q8", "float32"):
            raise ValueError(f"medusa: weights must be q8 or float32, got {self.opts.weights!r}")
        self.head = head if head is not None else _head(self.opts.head, target)
        if target.device.type == "cpu" and self.head.fast is None:
            self.head.pack_for_cpu(self.opts.weights if self.opts.weights != "float32" else None)
        self.width = self.opts.topk or spec.tree_width
        self.calibration = Calibration()

    def begin(self, seq: Sequence) -> MedusaState:
        return MedusaState()

    def fork(self, parent: Sequence, child: Sequence) -> MedusaState:
        state: MedusaState = parent.draft_state
        return MedusaState(state.hidden, state.position)

    # -- what the target computed -------------------------------------------------------------------

    def observe(self, seq: Sequence, draft: Draft, verdict: Verdict, scores: Scores) -> None:
        state: MedusaState = seq.draft_state
        if state.drafted is draft:  # not cut by the policy, nor another drafter's (auto)
            on_path = set(verdict.path)
            for node in range(1, draft.size):
                self.calibration.record(state.confidence[node], node in on_path)
        state.confidence = state.drafted = None
        state.hidden = scores.hidden[verdict.path[-1]].float().cpu().clone()
        state.position = len(seq.tokens) - 2  # the last accepted node's: seq holds the next root already

    # -- drafting -------------------------------------------------------------------------------------

    def propose(self, seq: Sequence, depth: int) -> Draft:
        return self.propose_batch([seq], [depth])[0]

    def propose_batch(self, seqs: list[Sequence], depths: list[int]) -> list[Draft]:
        """The heads on one row per sequence whose root they can draft for (they have seen the hidden
        state just before it), all at once, head after head while some path is still worth drafting;
        then each sequence's chain or tree."""
        drafts = [root_only(seq) for seq in seqs]
        ready = [i for i, seq in enumerate(seqs)
                 if seq.draft_state.hidden is not None and seq.draft_state.position == len(seq.tokens) - 2]
        depth = min(max([depths[i] for i in ready], default=0), self.head.config.num_heads)
        if not depth:
            return drafts
        floor = self.calibration.floor(self.opts.min_accept) if self.opts.min_accept > 0 else 0.0
        width = self.width if self.spec.tree_width > 1 else 1
        values, indices = [], []  # per head: [rows, width] its top probabilities and their draft ids
        best = torch.ones(len(ready))  # each row's most probable path so far
        with torch.no_grad():
            hidden = torch.stack([seqs[i].draft_state.hidden for i in ready])
            for logits in self.head.each_head(hidden):
                top = torch.softmax(logits.float(), dim=-1).topk(min(width, logits.shape[-1]), dim=-1)
                values.append(top.values)
                indices.append(top.indices)
                best = best * top.values[:, 0]
                if len(values) == depth or bool((best < floor).all()):
                    break
        p = torch.stack(values, dim=1)  # [rows, heads run, width]
        ids = self.head.draft_ids[torch.stack(indices, dim=1)]
        for row, i in enumerate(ready):
            budget = min(self.opts.nodes, seqs[i].room - 1)
            drafts[i] = self._tree(seqs[i], p[row].tolist(), ids[row], min(depths[i], p.shape[1]), budget, floor)
        return drafts

    def _tree(self, seq: Sequence, p: list[list[float]], ids: torch.Tensor, depth: int, budget: int,
              floor: float) -> Draft:
        """The `budget` most probable paths through the heads' candidates (a chain when there is one
        candidate per head), cut where a path's probability falls below `floor`."""
        shape = grow_shape(lambda d, r: p[d - 1][r], budget + 1, depth, len(p[0]))
        confidence = [1.0]
        for node in range(1, shape.size):
            confidence.append(confidence[shape.parents[node]] * p[shape.depths[node] - 1][shape.ranks[node]])
        # grown best-first, so confidence falls in node order: the nodes above the floor are a prefix
        keep = next((n for n in range(1, shape.size) if confidence[n] < floor), shape.size)
        shape = shape.subtree(list(range(keep)))
        tokens = [seq.root] + [int(ids[shape.depths[n] - 1, shape.ranks[n]]) for n in range(1, keep)]
        seq.draft_state.confidence = confidence[:keep]
        seq.draft_state.drafted = Draft(Tree(tokens=torch.tensor(tokens), parents=shape.parents))
        return seq.draft_state.drafted
