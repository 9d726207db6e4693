"""Draft models on the server: only those its operator named at start-up (--draft-model, and each
--allow-draft-model), each loaded once on the engine thread before the server is ready, and shared
by every speculation configuration that names it. Without this, every distinct configuration of a
draft-model method would load its model again on the engine thread, stalling every request.

A request may choose one of them by the path as the operator gave it. Any other path is refused
before anything looks at it, so a client can neither make the server read a file nor learn whether
one exists. Options that name files (a retrieval datastore) come only from the server's own flags:
a request's `speculation` cannot carry options (protocol.Speculation)."""
from __future__ import annotations

from forerun.config import SpecConfig
from forerun.drafters.draft_model import DraftModel
from forerun.drafters.rasd import RetrievalAugmented
from forerun.engine.engine import Engine
from forerun.serve.errors import bad_request

WITH_DRAFT_MODEL = {"draft": DraftModel, "rasd": RetrievalAugmented}  # drafters that take a loaded draft model


class DraftModels:
    def __init__(self, paths: tuple[str, ...]):
        self.paths = tuple(dict.fromkeys(paths))  # the allowed paths, as given, each once
        self.loaded: dict[str, object] = {}  # path -> its Runtime

    def check(self, path: str | None) -> None:
        """On the event loop: a request may name an allowed draft model only."""
        if path is not None and path not in self.paths:
            raise bad_request("speculation.draft_model: not a draft model this server allows (its operator "
                              "allows them with --allow-draft-model)", param="speculation.draft_model")

    def load(self, engine: Engine) -> None:
        """On the engine thread, before serving: each allowed draft model, loaded as method `draft`
        loads it (the target's dtype and device, its tokenizer checked against the target's)."""
        for path in self.paths:
            self.loaded[path] = DraftModel(engine.runtime, SpecConfig(method="draft", draft_model=path)).draft

    def add_drafter(self, engine: Engine, spec: SpecConfig) -> None:
        """On the engine thread: where `spec` is new to the engine and its method drafts with a model,
        its drafter built on the loaded model (the engine would load the model again)."""
        method = WITH_DRAFT_MODEL.get(spec.method)
        if method is None or spec in engine.drafters or spec.draft_model is None:
            return  # without a draft model, the engine's drafter says what is missing
        if spec.draft_model not in self.loaded:  # check() refused it already; never load it here
            raise ValueError("speculation.draft_model: not a draft model this server allows")
        engine.use_drafter(spec, method(engine.runtime, spec, draft=self.loaded[spec.draft_model]))
