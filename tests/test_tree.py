"""forerun.tree: a parent list's compiled structure (depths, children, ancestor mask, sibling ranks,
rank paths) on hand-built trees, and subtrees checked against a brute-force reference on random ones."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forerun.tree import Tree, TreeShape

BUSHY = [-1, 0, 0, 1, 1, 2]  # root; two children; two grandchildren under 1, one under 2
CHAIN = [-1, 0, 1, 2]


def tree(parents: list[int]) -> Tree:
    return Tree(tokens=torch.arange(10, 10 + len(parents)), parents=list(parents))


def as_mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_bushy_tree():
    t = TreeShape(BUSHY)
    assert torch.equal(t.mask, as_mask([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ]))
    assert t.depths == (0, 1, 1, 2, 2, 2)
    assert t.children == ((1, 2), (3, 4), (5,), (), (), ())
    assert t.ranks == (0, 0, 1, 0, 1, 0)
    assert t.rank_paths == ((), (0,), (1,), (0, 0), (0, 1), (1, 0))
    assert not t.is_chain


def test_chain_is_a_degenerate_tree():
    t = TreeShape(CHAIN)
    assert torch.equal(t.mask, torch.ones(4, 4, dtype=torch.bool).tril())
    assert t.depths == (0, 1, 2, 3)
    assert t.children == ((1,), (2,), (3,), ())
    assert t.ranks == (0, 0, 0, 0)
    assert t.rank_paths == ((), (0,), (0, 0), (0, 0, 0))
    assert t.is_chain and TreeShape([-1]).is_chain


def test_root_only_and_star_trees():
    assert torch.equal(TreeShape([-1]).mask, as_mask([[1]]))
    star = TreeShape([-1, 0, 0, 0])
    assert torch.equal(star.mask, as_mask([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]))
    assert star.depths == (0, 1, 1, 1) and star.children == ((1, 2, 3), (), (), ())
    assert star.rank_paths == ((), (0,), (1,), (2,)) and not star.is_chain


def test_deep_tree_with_late_branch():
    t = TreeShape([-1, 0, 1, 1, 3, 2])  # a chain 0-1-2 with a second branch 3-4 under node 1
    assert t.mask[4].tolist() == [True, True, False, True, True, False]
    assert t.mask[5].tolist() == [True, True, True, False, False, True]
    assert t.depths == (0, 1, 2, 2, 3, 3)
    assert t.children == ((1,), (2, 3), (5,), (4,), (), ())
    assert t.rank_paths[4] == (0, 1, 0) and not TreeShape([-1, 0, 0]).is_chain


def test_structure_is_computed_once():
    t = tree(BUSHY)
    assert t.depths is t.depths and t.mask is t.mask and t.children is t.children


def test_subtree_renumbers_parents_and_keeps_tokens():
    cut = tree(BUSHY).subtree([0, 1, 2, 4, 5])  # without node 3, node 1's first child
    assert cut.parents == [-1, 0, 0, 1, 2] and cut.tokens.tolist() == [10, 11, 12, 14, 15]
    assert cut.rank_paths[3] == (0, 0)  # node 4 moved up to its parent's first child


def test_subtree_structure_is_its_own():
    """Node 2 loses its earlier sibling, so it becomes the root's first child."""
    cut = tree(BUSHY).subtree([0, 2, 5])
    assert cut.parents == [-1, 0, 1] and cut.tokens.tolist() == [10, 12, 15]
    assert cut.depths == (0, 1, 2) and cut.children == ((1,), (2,), ())
    assert cut.ranks == (0, 0, 0) and cut.rank_paths == ((), (0,), (0, 0))
    assert cut.is_chain and torch.equal(cut.mask, torch.ones(3, 3, dtype=torch.bool).tril())


def test_subtree_of_a_chain_is_a_chain():
    cut = tree(CHAIN).subtree([0, 1, 2])
    assert cut.is_chain and cut.parents == [-1, 0, 1] and cut.tokens.tolist() == [10, 11, 12]
    assert isinstance(TreeShape(CHAIN).subtree([0, 1]), TreeShape)


def test_path_and_a_chain_grown_below_a_node():
    t = tree(BUSHY)
    assert t.path(0) == [] and t.path(5) == [12, 15]
    grown = t.grown(5, [20, 21])
    assert grown.parents == [*BUSHY, 5, 6] and grown.tokens.tolist()[6:] == [20, 21]
    assert grown.path(7) == [12, 15, 20, 21] and grown.depths[7] == t.depths[5] + 2


def test_malformed_trees_are_refused():
    for parents in ([], [0], [-1, 1], [-1, 0, 3], [-1, -1]):
        with pytest.raises(ValueError):
            TreeShape(parents)
    with pytest.raises(ValueError):
        Tree(tokens=torch.tensor([1, 2]), parents=[-1])
    with pytest.raises(ValueError):
        tree(BUSHY).subtree([1, 3])  # no root
    with pytest.raises(KeyError):
        tree(BUSHY).subtree([0, 3])  # node 3 without its parent


# --- random trees against brute force -------------------------------------------------------------

@st.composite
def trees(draw) -> Tree:
    n = draw(st.integers(1, 12))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    tokens = draw(st.lists(st.integers(0, 99), min_size=n, max_size=n))
    return Tree(tokens=torch.tensor(tokens), parents=parents)


@st.composite
def trees_and_kept_nodes(draw) -> tuple[Tree, list[int]]:
    """A tree and a set of its nodes closed under parents: random nodes with all their ancestors."""
    t = draw(trees())
    keep = set()
    for node in draw(st.sets(st.integers(0, t.size - 1))) | {0}:
        keep.update(ancestors_or_self(t.parents, node))
    return t, sorted(keep)


def ancestors_or_self(parents: list[int], node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(node)
        node = parents[node]
    return out


def reference_structure(parents: list[int]) -> dict:
    """Depths, children, mask, sibling ranks and rank paths, each from its definition."""
    n = len(parents)
    up = [ancestors_or_self(parents, i) for i in range(n)]
    ranks = [sum(parents[j] == parents[i] for j in range(i)) if i else 0 for i in range(n)]
    return {
        "depths": tuple(len(path) - 1 for path in up),
        "children": tuple(tuple(j for j in range(n) if parents[j] == i) for i in range(n)),
        "mask": torch.tensor([[j in up[i] for j in range(n)] for i in range(n)], dtype=torch.bool),
        "ranks": tuple(ranks),
        "rank_paths": tuple(tuple(ranks[a] for a in reversed(path[:-1])) for path in up),
        "is_chain": all(parents[i] == i - 1 for i in range(n)),
    }


def assert_structure(t: TreeShape) -> None:
    expected = reference_structure(t.parents)
    assert torch.equal(t.mask, expected.pop("mask"))
    assert {name: getattr(t, name) for name in expected} == expected


@settings(max_examples=300, deadline=None)
@given(trees())
def test_structure_matches_its_definition(t):
    assert_structure(t)


@settings(max_examples=300, deadline=None)
@given(trees_and_kept_nodes())
def test_subtree_matches_brute_force(case):
    t, keep = case
    cut = t.subtree(keep)
    assert cut.parents == [-1] + [keep.index(t.parents[old]) for old in keep[1:]]
    assert cut.tokens.tolist() == [t.tokens[old].item() for old in keep]
    assert torch.equal(cut.mask, t.mask[keep][:, keep])  # ancestors are kept with their descendants
    assert cut.depths == tuple(t.depths[old] for old in keep)
    assert_structure(cut)
