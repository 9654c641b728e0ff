"""The model's own routing: top-k with ties to the lowest index, the three router kinds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx_sim.routing import RouterSpec, route, topk_lowest_index


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 50), st.integers(1, 20), st.integers(1, 6), st.booleans())
def test_topk_matches_stable_sort(seed, rows, E, levels, inf):
    """Fast path == stable sort, also with heavy ties and -inf masks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (rows, E), generator=g).float()
    if inf:
        x[torch.rand(rows, E, generator=g) < 0.3] = float("-inf")
    for k in range(1, E + 1):
        v, i = topk_lowest_index(x, k)
        v_ref, i_ref = torch.sort(x, dim=-1, descending=True, stable=True)
        assert torch.equal(i, i_ref[:, :k]) and torch.equal(v, v_ref[:, :k])


def test_softmax_renormalised_and_not():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(z, -1)
    ids, w = route(z, RouterSpec(4, 2, renormalize=True))
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(w, p[:, :2] / p[:, :2].sum())
    _, w = route(z, RouterSpec(4, 2, renormalize=False))
    torch.testing.assert_close(w, p[:, :2])


def test_mask_restricts_choice():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    allowed = torch.tensor([[False, True, False, True]])
    ids, w = route(z, RouterSpec(4, 2, renormalize=False), allowed)
    assert ids.tolist() == [[1, 3]]
    torch.testing.assert_close(w, torch.softmax(z, -1)[:, [1, 3]])  # the full softmax's scores of the allowed experts


def test_grouped_non_renormalising_weights_are_the_full_softmax():
    """DeepSeek-V2 without renormalisation: softmax over all E, groups masked, top-k (review finding)."""
    z = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -2.0, -3.0]])
    spec = RouterSpec(8, 2, "grouped_topk", renormalize=False, n_group=4, topk_group=1)
    ids, w = route(z, spec)
    p = torch.softmax(z, -1)
    assert ids.tolist() == [[5, 4]]  # group 2 (experts 4, 5) holds the best expert
    torch.testing.assert_close(w, p[:, [5, 4]])


def test_sigmoid_router():
    z = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    ids, w = route(z, RouterSpec(4, 2, "sigmoid", renormalize=False))
    assert ids.tolist() == [[1, 3]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[3.0, 2.0]])))


def test_grouped_router_uses_best_groups_only():
    # 4 groups of 2; group scores (max softmax) rank groups 3 and 0 first; expert 4 is high but in group 2
    z = torch.tensor([[3.0, 0.0, 0.0, 0.0, 2.9, 0.0, 2.95, 2.8]])
    spec = RouterSpec(8, 2, "grouped_topk", renormalize=True, n_group=4, topk_group=2)
    ids, _ = route(z, spec)
    assert ids.tolist() == [[0, 6]]


def test_bad_router_spec():
    with pytest.raises(ValueError, match="router kind"):
        RouterSpec(8, 2, "argmax")
    with pytest.raises(ValueError, match="top_k"):
        RouterSpec(8, 9)
    with pytest.raises(ValueError, match="n_group"):
        RouterSpec(8, 2, "grouped_topk", n_group=3)
