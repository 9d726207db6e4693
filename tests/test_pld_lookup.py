"""Prompt lookup's n-gram search against the definition, checked by brute force, and the token
array it searches, kept in step with the sequence's list."""
import numpy as np
import pytest

from forerun.drafters.pld import TokenArray, lookup


def brute_force(tokens: list[int], n_max: int, n_min: int, k: int) -> tuple[list[int], int]:
    """The longest suffix n-gram (n_max down to n_min) that occurs earlier, its latest occurrence,
    and the k tokens after it."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[-n:]
        starts = [s for s in range(len(tokens) - n) if tokens[s:s + n] == suffix]
        if starts:
            return tokens[starts[-1] + n:starts[-1] + n + k], n
    return [], 0


@pytest.mark.parametrize("vocab", [2, 5, 50, 50_000])
def test_lookup_finds_the_latest_match_of_the_longest_suffix(vocab):
    rng = np.random.default_rng(vocab)
    for _ in range(300):
        tokens = rng.integers(0, vocab, rng.integers(1, 60)).tolist()
        n_min = int(rng.integers(1, 3))
        n_max = int(rng.integers(n_min, 5))
        k = int(rng.integers(1, 6))
        assert lookup(np.asarray(tokens), n_max, n_min, k) == brute_force(tokens, n_max, n_min, k), tokens


def test_token_array_follows_the_list():
    array, tokens = TokenArray(), []
    rng = np.random.default_rng(0)
    for step in range(400):
        tokens += rng.integers(0, 9, rng.integers(1, 5)).tolist()
        if step % 97 == 96:  # cut, or rewritten at the same length: copied again
            del tokens[len(tokens) // 2:]
        if step % 131 == 130:
            tokens[-1] = 1000 + step
        assert array.of(tokens).tolist() == tokens
