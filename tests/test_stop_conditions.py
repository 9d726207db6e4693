"""Stop conditions the server needs from the engine: stop_token_ids end a sample like EOS (finish
"stop", also under ignore_eos, also inside an accepted draft); include_stop_str_in_output keeps the
stop string; a vanishing top_p keeps the most likely token instead of none; draft counts in Stats;
stop strings are matched incrementally, as decoding everything at every step would, in linear work."""
import pytest
import torch

from conftest import StubTokenizer, cycle_runtime
from forerun import LLM, SamplingParams, SpecConfig
from forerun.models.runtime import Runtime
from forerun.sampling import target_probs
from forerun.stream import TextStream


def cycle_llm() -> tuple[LLM, list[int]]:
    rt, cycle = cycle_runtime(seed=0)
    return LLM(runtime=Runtime(model=rt.model, tokenizer=StubTokenizer(), name=rt.name)), cycle


def test_stop_token_ids_end_a_sample_even_inside_a_draft():
    llm, cycle = cycle_llm()
    prompt = cycle + cycle[:4]
    stop = cycle[4 + 5]  # the sixth token plain decoding emits
    for method in ("ar", "pld"):
        params = SamplingParams(max_new_tokens=30, ignore_eos=True, stop_token_ids=(stop,))
        out = llm.generate_ids(prompt, params, SpecConfig(method=method))
        assert out.token_ids == cycle[4:9] and out.finish_reason == "stop", method
    pld = llm.generate_ids(prompt, SamplingParams(max_new_tokens=30, stop_token_ids=(stop,)), SpecConfig(method="pld"))
    assert pld.stats.drafts >= 1 and pld.stats.draft_tokens >= pld.stats.drafts  # it did speculate
    assert max(pld.stats.accept_histogram) > 1


def test_include_stop_str_in_output_keeps_the_stop_string():
    llm, cycle = cycle_llm()
    prompt = cycle + cycle[:4]
    stop = f" {cycle[6]} {cycle[7]}"  # the StubTokenizer writes ids as numbers, space-separated
    cut = llm.generate_ids(prompt, SamplingParams(max_new_tokens=30, stop=(stop,)), SpecConfig(method="pld"))
    kept = llm.generate_ids(prompt, SamplingParams(max_new_tokens=30, stop=(stop,), include_stop_str_in_output=True),
                            SpecConfig(method="pld"))
    assert cut.finish_reason == kept.finish_reason == "stop"
    assert kept.text == cut.text + stop and kept.token_ids == cycle[4:8]
    assert cut.token_ids == cycle[4:6]


def test_a_vanishing_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    probs = target_probs(logits, SamplingParams(temperature=1.0, top_p=5e-324))
    assert torch.equal(probs, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def embedded_tokenizer():
    from forerun.models.embedded import embedded_model_dir
    from forerun.models.tokenizer import Tokenizer
    return Tokenizer.from_dir(embedded_model_dir())


def reference_stop(tokenizer, chunks: list[list[int]], stop: tuple[str, ...], include: bool) -> tuple[bool, str]:
    """The definition incremental matching must meet: after each chunk, decode every id so far and
    cut at the earliest stop string (of several starting there, the longest)."""
    ids = []
    for chunk in chunks:
        ids += chunk
        text = tokenizer.decode(ids)
        hits = [(text.find(s), -len(s), s) for s in stop if s in text]
        if hits:
            at, _, s = min(hits)
            return True, text[:at + len(s) if include else at]
    return False, tokenizer.decode(ids)


def streamed_stop(tokenizer, chunks: list[list[int]], stop: tuple[str, ...], include: bool):
    streamed = []
    stream = TextStream(tokenizer, stop, streamed.append, include)
    fed = []
    for chunk in chunks:
        fed += chunk
        if stream(chunk):
            break
    return stream, fed, stream.final_text(fed), "".join(streamed)


@pytest.mark.parametrize("stop, include", [
    (("wörld",), False),  # a multi-byte character inside the stop string
    (("日本語",), True),  # characters of several bytes each, over several tokens
    (("の",), False),  # a stop string that is part of a character-by-character token run
    (("🙃 end",), True),  # a four-byte character whose bytes span tokens, then a space and a word
    (("cat sat on",), False),  # a stop string spanning several tokens
    (("mat", "at"), False),  # two stop strings that match: the earliest wins
    (("zzz",), False),  # never matches: the whole text
])
def test_incremental_stop_strings_equal_decoding_everything(stop, include):
    tokenizer = embedded_tokenizer()
    ids = tokenizer.encode("Hello wörld, ça va? 日本語のテキスト 🙂🙃 end. The cat sat on the mat.", add_bos=False)
    for size in (1, 3, 7):
        chunks = [ids[i:i + size] for i in range(0, len(ids), size)]
        stream, fed, text, streamed = streamed_stop(tokenizer, chunks, stop, include)
        assert (stream.stopped, text) == reference_stop(tokenizer, chunks, stop, include), size
        assert streamed == text  # the stream never sends what the stop cut off
        if stream.stopped:  # the ids kept are the fewest whose text holds every character kept
            assert tokenizer.decode(fed[:stream.cut_ids]).startswith(text)
            assert len(tokenizer.decode(fed[:stream.cut_ids - 1]).rstrip("\ufffd")) < len(text)


class CountingTokenizer:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = list(ids)
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, skip_special)


def test_stop_string_matching_work_grows_linearly_with_the_output():
    """Decoding the whole output again at every step costs n^2 / 2 ids over n ids; the incremental
    window decodes each id a few times."""
    tokenizer = embedded_tokenizer()
    ids = tokenizer.encode("Ünïcödé text, 日本語 and emoji 🙂 in a long answer. " * 80, add_bos=False)
    counting = CountingTokenizer(tokenizer)
    streamed = []
    stream = TextStream(counting, ("never appears", "\n\n"), streamed.append)
    for i in range(0, len(ids), 3):
        assert not stream(ids[i:i + 3])
    assert stream.final_text(ids) == "".join(streamed) == tokenizer.decode(ids)
    assert len(ids) > 1500 and counting.decoded < 6 * len(ids), (len(ids), counting.decoded)
