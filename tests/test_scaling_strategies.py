"""Each strategy on a scripted generator and scorer, against results worked out by hand."""
import math

import numpy as np
import pytest
from scripted import ScriptedGenerator, ScriptedScorer

from forerun.scaling.answers import extract_answer
from forerun.scaling.run import solve
from forerun.scaling.strategies import STRATEGIES, Solver, build_strategy
from forerun.scaling.strategies.adaptive import leader_probability, settled
from forerun.scaling.types import Query

S = "\n\n"


def solver(script, scores=None, **kw):
    return Solver(ScriptedGenerator(script), extract_answer, ScriptedScorer(scores) if scores else None, **kw)


def test_sample_answers_with_the_first_and_keeps_all():
    s = solver({"": ["#### 1", "#### 2", "#### 2"]})
    out = solve(build_strategy("sample"), s, "q", 3)
    assert out.answer == "1" and [c.answer for c in out.candidates] == ["1", "2", "2"]
    assert s.generator.calls == [[("", 3, None)]]  # one request of n = 3: forked from one prefill


def test_vote_majority_and_first_seen_tie_break():
    s = solver({"": ["#### 7", "#### 5", "#### 3", "#### 5", "#### 3", "no answer", "no answer"]})
    out = solve(build_strategy("vote"), s, "q", 7)
    assert out.answer == "5"  # 5 and 3 both have two votes; 5 was seen first; None does not vote
    s = solver({"": ["#### 1", "#### 2", "#### 2"]})
    assert solve(build_strategy("vote"), s, "q", 3).answer == "2"


def test_best_of_n_takes_the_highest_score():
    script = {"": ["#### 1", "#### 2", "#### 3"]}
    out = solve(build_strategy("best-of-n"), solver(script, {"#### 1": -2.0, "#### 2": -0.5, "#### 3": -0.5}), "q", 3)
    assert out.answer == "2"  # a tie at -0.5: the first
    assert [c.score for c in out.candidates] == [-2.0, -0.5, -0.5]


def test_weighted_best_of_n_sums_weights_per_answer():
    # Answer 3 twice with p = 0.3 (weight 0.6) beats answer 5 once with p = 0.5, which best-of-n picks.
    texts = ["x #### 3", "y #### 3", "#### 5"]
    scores = {"x #### 3": math.log(0.3), "y #### 3": math.log(0.3), "#### 5": math.log(0.5)}
    out = solve(build_strategy("weighted-best-of-n"), solver({"": texts}, scores), "q", 3)
    assert out.answer == "3"
    assert out.notes["weights"] == pytest.approx({"3": 1.2, "5": 1.0})  # relative to the best score, 0.5
    assert solve(build_strategy("best-of-n"), solver({"": texts}, scores), "q", 3).answer == "5"


def test_beam_keeps_the_best_width_and_extends_them_in_one_batch():
    script = {"": ["a" + S, "b" + S, "c" + S, "d" + S],
              "b" + S: ["b1 #### 1", "b2 #### 2"], "c" + S: ["c1 #### 3", "c2 #### 4"]}
    scores = {"a" + S: -1.0, "b" + S: -0.1, "c" + S: -0.5, "d" + S: -2.0,
              "b\n\nb1 #### 1": -0.9, "b\n\nb2 #### 2": -0.3, "c\n\nc1 #### 3": -0.2, "c\n\nc2 #### 4": -3.0}
    s = solver(script, scores, max_steps=2)
    out = solve(build_strategy("beam", width=2), s, "q", 4)
    assert s.generator.calls == [[("", 4, S)], [("b" + S, 2, None), ("c" + S, 2, None)]]  # a and d pruned
    assert out.answer == "3" and out.chosen.score == -0.2
    assert sorted(c.answer for c in out.candidates) == ["1", "2", "3", "4"]
    assert out.notes["rounds"] == 2


def test_beam_carries_finished_beams_and_stops_when_all_are_finished():
    script = {"": ["done #### 9", "a" + S], "a" + S: ["a1" + S, "a2" + S], "a\n\na1" + S: ["#### 1", "#### 3"]}
    scores = {"done #### 9": -0.1, "a" + S: -0.2, "a\n\na1" + S: -0.05, "a\n\na2" + S: -1.0,
              "a\n\na1\n\n#### 1": -0.01, "a\n\na1\n\n#### 3": -5.0}
    s = solver(script, scores, max_steps=3)
    out = solve(build_strategy("beam", width=2), s, "q", 2)
    # round 2: the finished beam stays, "a" gets both continuations; round 3: a1 (-0.05) and the
    # finished beam (-0.1) survive, a2 (-1.0) is pruned; a1 is finished with both continuations
    assert s.generator.calls[1] == [("a" + S, 2, S)]
    assert s.generator.calls[2] == [("a\n\na1" + S, 2, None)]
    assert len(s.generator.calls) == 3
    assert out.answer == "1" and sorted(c.answer for c in out.candidates) == ["1", "3", "9"]


def test_particles_weights_are_a_softmax_and_resampling_follows_the_rng():
    script = {"": ["a" + S, "b" + S, "c" + S], "a" + S: ["#### 1", "#### 2", "#### 3"]}
    scores = {"a" + S: 0.0, "b" + S: -50.0, "c" + S: -50.0, "a\n\n#### 1": -1.0, "a\n\n#### 2": -0.2,
              "a\n\n#### 3": -3.0}
    s = solver(script, scores, max_steps=2, seed=7)
    out = solve(build_strategy("particles", temperature=1.0), s, "q", 3)
    first = out.notes["resampling"][0]
    assert first["weights"] == pytest.approx([1.0, 0.0, 0.0], abs=1e-9)
    assert first["picks"] == [0, 0, 0]
    assert s.generator.calls[1] == [("a" + S, 3, None)]  # three copies of a: one forked request
    assert out.answer == "2"


def test_particles_resample_with_the_seeded_rng_and_temperature():
    script = {"": ["a" + S, "b" + S, "c" + S, "d" + S], "a" + S: ["#### 1"] * 4, "b" + S: ["#### 2"] * 4,
              "c" + S: ["#### 3"] * 4, "d" + S: ["#### 4"] * 4}
    step = {"a" + S: -1.0, "b" + S: -2.0, "c" + S: -0.5, "d" + S: -1.5}
    final = {f"{k}#### {i}": -1.0 for i, k in enumerate(step, 1)}
    s = solver(script, step | final, max_steps=2, seed=3)
    out = solve(build_strategy("particles", temperature=0.5), s, "q", 4)
    x = np.array([-1.0, -2.0, -0.5, -1.5]) / 0.5
    expected_w = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    expected_picks = np.random.default_rng([3, Query("q", ()).key]).choice(4, size=4, p=expected_w)
    first = out.notes["resampling"][0]
    assert first["weights"] == pytest.approx(expected_w.tolist(), abs=1e-6)
    assert first["picks"] == expected_picks.tolist()
    survivors = sorted(expected_picks.tolist())
    texts = ["a" + S, "b" + S, "c" + S, "d" + S]
    expected_requests = [(texts[i], survivors.count(i), None) for i in dict.fromkeys(survivors)]
    assert s.generator.calls[1] == expected_requests


def test_astar_expands_by_g_plus_h_and_stops_at_the_first_accepted_finish():
    # horizon 3: f = g + (g / steps) * (3 - steps) for partials; finished ones f = g.
    script = {"": ["x" + S, "y" + S], "y" + S: ["y1" + S, "y2 #### 5"], "x" + S: ["x1 #### 7", "x2" + S],
              "y\n\ny1" + S: ["#### 8", "#### 9"]}
    scores = {"x" + S: -0.5, "y" + S: -0.2,                       # f: x -1.5, y -0.6
              "y\n\ny1" + S: -0.3, "y\n\ny2 #### 5": -2.0,         # f: y1 (g -0.5) -0.75, y2 finished -2.2
              "y\n\ny1\n\n#### 8": -0.1, "y\n\ny1\n\n#### 9": -0.9,  # finished: f -0.6 and -1.4
              "x\n\nx1 #### 7": -0.1, "x\n\nx2" + S: -5.0}
    s = solver(script, scores, max_steps=3)
    out = solve(build_strategy("astar", branching=2, accept=-0.05), s, "q", 4)
    # Expanded: root, y (f -0.6), y1 (-0.75). Then #### 8 (f -0.6) and #### 9 (-1.4) are popped finished
    # but score below accept, and x (-1.5) is expanded: the 4th expansion ends the search, and the best
    # finished solution seen is chosen (#### 8 and x1 #### 7 tie at -0.1: the first found).
    assert out.notes["popped"] == ["", "y" + S, "y\n\ny1" + S, "y\n\ny1\n\n#### 8", "y\n\ny1\n\n#### 9", "x" + S]
    assert out.notes["expanded"] == 4
    assert out.answer == "8"
    assert [c.answer for c in out.candidates] == ["5", "8", "9", "7"]


def test_astar_accepts_the_first_finished_popped():
    script = {"": ["x" + S, "y" + S], "y" + S: ["#### 5", "#### 6"], "x" + S: ["#### 7", "#### 8"]}
    scores = {"x" + S: -0.5, "y" + S: -0.2, "y\n\n#### 5": -0.4, "y\n\n#### 6": -0.1}
    s = solver(script, scores, max_steps=2)
    out = solve(build_strategy("astar", branching=2), s, "q", 10)
    assert out.answer == "6"  # f(#### 6) = -0.3 beats f(#### 5) = -0.6 and f(x) = -1.0
    assert out.notes["popped"] == ["", "y" + S, "y\n\n#### 6"]
    assert s.generator.calls == [[("", 2, S)], [("y" + S, 2, None)]]  # x never expanded


def test_adaptive_stops_once_the_vote_is_settled():
    s = solver({"": ["#### 4"] * 16})
    out = solve(build_strategy("adaptive", wave=4, confidence=0.95), s, "q", 16)
    # 4 votes to 0: P(Bin(5, 1/2) <= 4) = 31/32 >= 0.95 after the first wave
    assert out.answer == "4" and out.notes == {"samples": 4, "pruned": 0, "stopped_early": True}
    split = ["#### 1", "#### 2"] * 8
    out = solve(build_strategy("adaptive", wave=4, confidence=0.95), solver({"": split}), "q", 16)
    assert out.notes["samples"] == 16 and not out.notes["stopped_early"]


def test_adaptive_prunes_by_mid_generation_self_evaluation():
    script = {"": ["good" + S, "bad" + S, "#### 3"], "good" + S: ["#### 2"]}
    scores = {"good" + S: math.log(0.8), "bad" + S: math.log(0.1)}
    s = solver(script, scores)
    out = solve(build_strategy("adaptive", wave=3, prune=math.log(0.5)), s, "q", 3)
    assert s.generator.calls == [[("", 3, S)], [("good" + S, 1, None)]]  # "bad" is never finished
    assert out.notes["pruned"] == 1 and sorted(c.answer for c in out.candidates) == ["2", "3"]


def test_leader_probability_is_the_beta_tail():
    assert leader_probability(0, 0) == 0.5
    assert leader_probability(4, 0) == 31 / 32
    assert leader_probability(3, 1) == pytest.approx(26 / 32)  # P(Bin(5, 1/2) <= 3)
    assert settled(["1"] * 4, 0.95) and not settled(["1"] * 3 + ["2"], 0.95) and not settled([None], 0.5)


def test_strategies_reject_bad_input():
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("nope")
    with pytest.raises(ValueError, match="no option 'depth'"):
        build_strategy("beam", depth=3)
    with pytest.raises(ValueError, match="width"):
        build_strategy("beam", width=0)
    with pytest.raises(ValueError, match="needs a scorer"):
        solve(build_strategy("best-of-n"), solver({"": ["#### 1"]}), "q", 1)
    with pytest.raises(ValueError, match="budget"):
        solve(build_strategy("vote"), solver({"": []}), "q", 0)
    assert build_strategy("particles", temperature="0.5").temperature == 0.5  # CLI strings convert
    assert set(STRATEGIES) == {"sample", "vote", "best-of-n", "weighted-best-of-n", "beam", "particles", "astar",
                               "adaptive"}


def test_astar_finishes_the_best_partial_when_the_budget_ends_first():
    script = {"": ["x" + S, "y" + S], "y" + S: ["#### 4"]}
    scores = {"x" + S: -0.5, "y" + S: -0.2, "y\n\n#### 4": -0.3}
    s = solver(script, scores, max_steps=5)
    out = solve(build_strategy("astar", branching=2), s, "q", 1)  # one expansion: the root
    assert s.generator.calls[-1] == [("y" + S, 1, None)]  # y (mean step score -0.2) beats x
    assert out.answer == "4" and out.notes["expanded"] == 1


def test_without_any_extracted_answer_vote_and_weighted_fall_back():
    texts = ["no", "none", "nothing"]
    out = solve(build_strategy("vote"), solver({"": texts}), "q", 3)
    assert out.answer is None and out.chosen.text == "no"
    scores = {"no": -3.0, "none": -1.0, "nothing": -2.0}
    out = solve(build_strategy("weighted-best-of-n"), solver({"": texts}, scores), "q", 3)
    assert out.chosen.text == "none"  # no answer to weigh: the best-scored solution


def test_beam_width_above_the_budget_is_cut_to_it():
    script = {"": ["#### 1"]}
    out = solve(build_strategy("beam", width=4), solver(script, {"#### 1": -1.0}), "q", 1)
    assert out.notes["width"] == 1 and out.answer == "1"
