"""Stop conditions the server needs from the engine: stop_token_ids end a sample like EOS (finish
"stop", also under ignore_eos, also inside an accepted draft); include_stop_str_in_output keeps the
stop string; a vanishing top_p keeps the most likely token instead of none; draft counts in Stats."""
import torch

from conftest import StubTokenizer, cycle_runtime
from forerun import LLM, SamplingParams, SpecConfig
from forerun.models.runtime import Runtime
from forerun.sampling import target_probs


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
