"""Mask maths of SPEC section 2, on random channel counts, steps and logits (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from s2hpruner.core import masks as M
from s2hpruner.core.structure import candidate_widths, default_width_step


@st.composite
def group_case(draw):
    channels = draw(st.integers(1, 96))
    step = draw(st.integers(1, channels))
    cands = candidate_widths(channels, step)
    logits = draw(
        st.lists(st.floats(-6, 6, allow_nan=False), min_size=len(cands), max_size=len(cands))
    )
    return channels, step, cands, torch.tensor(logits, dtype=torch.float64)


@settings(max_examples=150, deadline=None)
@given(group_case())
def test_relaxed_mask_properties(case):
    channels, _, cands, logits = case
    c = torch.tensor(cands, dtype=torch.float64)
    p = M.width_probabilities(logits)
    w = M.relaxed_mask(p, M.keep_matrix(c, channels).double())
    assert w.shape == (channels,)
    assert torch.isclose(w[0], torch.tensor(1.0, dtype=torch.float64))
    assert (w[1:] <= w[:-1] + 1e-12).all(), "relaxed mask must be non-increasing in rank"
    assert (w >= -1e-12).all() and (w <= 1 + 1e-12).all()
    # sum of the relaxed mask is the expected width
    assert torch.isclose(w.sum(), M.expected_width(p, c))


@settings(max_examples=150, deadline=None)
@given(group_case())
def test_relaxed_mask_by_index_equals_the_matrix_form(case):
    """The pruner's gather form of w equals the SPEC's sum over kept candidates, and so does
    its gradient."""
    channels, _, cands, logits = case
    logits = logits.clone().requires_grad_(True)
    c = torch.tensor(cands, dtype=torch.float64)
    p = M.width_probabilities(logits)
    reference = M.relaxed_mask(p, M.keep_matrix(c, channels).double())
    gathered = M.relaxed_mask_by_index(p, M.first_keeping(c, channels))
    assert torch.allclose(gathered, reference, atol=1e-12)
    weights = torch.linspace(-1, 1, channels, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad((reference * weights).sum(), logits, retain_graph=True)
    (g_new,) = torch.autograd.grad((gathered * weights).sum(), logits)
    assert torch.allclose(g_new, g_ref, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(group_case())
def test_hard_width_is_smallest_candidate_at_least_expected(case):
    channels, step, cands, logits = case
    c = torch.tensor(cands, dtype=torch.float64)
    e = M.expected_width(M.width_probabilities(logits), c)
    h = M.hard_width(e, c)
    assert float(h) in cands
    assert float(h) >= float(e) - 1e-4 * step
    smaller = [k for k in cands if k < float(h)]
    assert not smaller or smaller[-1] < float(e) - 1e-6
    if channels % step == 0:  # the SPEC formula H = min(C, d * ceil(E / d))
        expected = min(channels, step * torch.ceil((e - 1e-4 * step) / step))
        assert float(h) == float(expected)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 96), st.integers(1, 16), st.floats(0.5, 96.0))
def test_nearest_width_is_the_closest_aligned_width(channels, multiple, expected):
    """round_to's H: the closest of m, 2m, ... and C to E (ties up), gradient straight through."""
    widths = list(range(multiple, channels, multiple)) + [channels]
    e = torch.tensor(min(expected, float(channels)), dtype=torch.float64, requires_grad=True)
    h = M.nearest_width(e, torch.tensor(widths, dtype=torch.float64))
    assert float(h) in widths
    best = min(abs(w - float(e)) for w in widths)
    assert abs(float(h) - float(e)) == best
    if sum(abs(w - float(e)) == best for w in widths) > 1:
        assert float(h) > float(e), "ties go up"
    (grad,) = torch.autograd.grad(h, e)
    assert float(grad) == 1.0


def test_hard_width_straight_through_gradient():
    c = torch.tensor([2.0, 4.0, 6.0, 8.0])
    logits = torch.tensor([0.1, -0.3, 0.5, 1.0], requires_grad=True)
    e = M.expected_width(M.width_probabilities(logits), c)
    h = M.hard_width(e, c)
    (g_h,) = torch.autograd.grad(h, logits)
    (g_e,) = torch.autograd.grad(M.expected_width(M.width_probabilities(logits), c), logits)
    assert torch.allclose(g_h, g_e)


@settings(max_examples=60, deadline=None)
@given(group_case())
def test_hard_mask_value_and_gradient_only_through_kept(case):
    channels, _, cands, logits = case
    logits = logits.clone().requires_grad_(True)
    c = torch.tensor(cands, dtype=torch.float64)
    p = M.width_probabilities(logits)
    w = M.relaxed_mask(p, M.keep_matrix(c, channels).double())
    kept = int(M.hard_width(M.expected_width(p, c), c))
    m_hat = M.hard_mask(w, kept)
    assert torch.equal(m_hat.detach(), (torch.arange(channels) < kept).double())
    jac = torch.stack(
        [torch.autograd.grad(m_hat[r], logits, retain_graph=True)[0] for r in range(channels)]
    )
    assert torch.all(jac[kept:] == 0), "pruned channels must send no gradient to the logits"
    jac_w = torch.stack(
        [torch.autograd.grad(w[r], logits, retain_graph=True)[0] for r in range(kept)]
    )
    assert torch.allclose(jac[:kept], jac_w), "kept channels carry the relaxed mask's gradient"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=64))
def test_channel_ranks_is_a_permutation_ordered_by_importance(values):
    imp = torch.tensor(values)
    ranks = M.channel_ranks(imp)
    assert sorted(ranks.tolist()) == list(range(len(values)))
    order = torch.argsort(ranks)
    assert (imp[order][1:] <= imp[order][:-1]).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4096), st.integers(2, 64))
def test_default_width_step(channels, max_candidates):
    d = default_width_step(channels, max_candidates)
    assert channels % d == 0 and channels // d <= max_candidates
    assert all(channels % s or channels // s > max_candidates for s in range(1, d))


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 512), st.integers(1, 64))
def test_initial_logits_nearly_full(channels, step):
    step = min(step, channels)
    cands = candidate_widths(channels, step)
    logits = M.initial_logits(cands, step)
    c = torch.tensor(cands, dtype=torch.float32)
    e = float(M.expected_width(M.width_probabilities(logits), c))
    target = channels - (step if len(cands) > 2 else step / 2)
    assert abs(e - max(target, float(c.mean()))) < 1e-3 * channels
    assert logits[:-1].eq(0).all() and logits[-1] >= 0, "all groups start the same way"


@settings(max_examples=60, deadline=None)
@given(st.lists(group_case(), min_size=1, max_size=5), st.integers(0, 2**31 - 1))
def test_batched_groups_equal_one_group_at_a_time(cases, seed):
    """The pruner computes all groups' masks, widths and ranks in padded batches
    (WidthSearch); each group must get exactly what the one-group functions give it."""
    from s2hpruner.core.search import WidthSearch
    from s2hpruner.core.structure import ChannelGroup

    groups = [ChannelGroup(name=f"g{i}", channels=ch, step=st_, candidates=list(c))
              for i, (ch, st_, c, _) in enumerate(cases)]  # fmt: skip
    search = WidthSearch(groups).double()
    with torch.no_grad():
        for u, (*_, logits) in zip(search.logits, cases, strict=True):
            u.copy_(logits)
    index = search.index
    importance = torch.randn(len(index.group_of), generator=torch.Generator().manual_seed(seed))
    importance = importance.round(decimals=1)  # ties must break by channel index too
    search.ranks.copy_(M.grouped_ranks(importance, index.group_of, index.group_offsets))
    soft, hard = search.flat_masks("soft"), search.flat_masks("hard")
    widths = search.hard_widths().detach()
    for i, (channels, _, cands, logits) in enumerate(cases):
        c = torch.tensor(cands, dtype=torch.float64)
        p = M.width_probabilities(logits)
        ranks = M.channel_ranks(importance[index.offsets[i] : index.offsets[i] + channels])
        assert torch.equal(search.group_ranks(i), ranks)
        w = M.relaxed_mask(p, M.keep_matrix(c, channels).double())
        h = M.hard_width(M.expected_width(p, c), c)
        assert float(widths[i]) == float(h)
        part = slice(index.offsets[i], index.offsets[i] + channels)
        assert torch.allclose(soft[part], w[ranks])
        assert torch.equal(hard[part], M.hard_mask(w, int(round(float(h))))[ranks])
