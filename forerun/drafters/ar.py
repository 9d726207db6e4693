"""Plain autoregressive decoding: the drafter that proposes nothing."""
from forerun.drafters.base import Drafter, Sequence, root_only
from forerun.drafters.registry import register
from forerun.types import Draft


@register("ar")
class NoDrafter(Drafter):
    def propose(self, seq: Sequence, depth: int) -> Draft:
        return root_only(seq)
