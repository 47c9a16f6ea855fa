"""The pure tensor core: destinations, matching, merge modes, the plan."""

import math

import pytest
import torch

from tofu_diffusion.core import (
    alternating_partition,
    attention_received,
    bidirectional_matching,
    bipartite_soft_matching,
    grid_partition,
    hashed,
    mctf_scores,
    mix_key,
    mlerp,
    plan_from_pairs,
)


# ------------------------------------------------------------------ destinations
@pytest.mark.parametrize("h,w,stride", [(8, 8, (2, 2)), (7, 9, (2, 2)), (5, 6, (2, 3)), (9, 4, (4, 4))])
def test_grid_partition_one_destination_per_cell(h, w, stride):
    sy, sx = stride
    for options in ({}, {"generator": torch.Generator().manual_seed(3)}, {"key": mix_key(3, 981000)}):
        src, dst = grid_partition((h, w), stride, **options)
        assert sorted(torch.cat([src, dst]).tolist()) == list(range(h * w))
        rows, cols = dst // w, dst % w
        cells = set(zip((rows // sy).tolist(), (cols // sx).tolist()))
        assert len(cells) == dst.numel() == (h // sy) * (w // sx)
        # leftover rows/columns hold only sources
        assert (rows < (h // sy) * sy).all() and (cols < (w // sx) * sx).all()


def test_grid_partition_fixed_position_and_seeded_randomness():
    _, dst = grid_partition((4, 4), (2, 2), position=3)
    assert sorted(dst.tolist()) == [5, 7, 13, 15]  # bottom-right of each 2x2 cell
    a = grid_partition((16, 16), generator=torch.Generator().manual_seed(7))[1]
    b = grid_partition((16, 16), generator=torch.Generator().manual_seed(7))[1]
    c = grid_partition((16, 16), generator=torch.Generator().manual_seed(8))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hashed_draws_are_uniform_repeatable_and_the_same_for_int_and_tensor_keys():
    key = mix_key(0, torch.tensor(981000), 3)
    assert int(key) == mix_key(0, 981000, 3)  # a tensor key (a timestep on the device) hashes like an int
    draws = hashed(key, 40_000) % 4
    counts = torch.bincount(draws, minlength=4).float()
    assert (counts / 10_000 - 1).abs().max() < 0.05  # each of the 4 positions ~1/4 of the time
    assert torch.equal(hashed(key, 40_000), hashed(int(key), 40_000))
    # neighbouring keys (consecutive steps or blocks) give unrelated draws
    agree = (hashed(mix_key(0, 981000, 3), 40_000) % 4 == hashed(mix_key(0, 981000, 4), 40_000) % 4).float().mean()
    assert abs(agree.item() - 0.25) < 0.02
    a = grid_partition((16, 16), key=mix_key(7))[1]
    assert torch.equal(a, grid_partition((16, 16), key=mix_key(7))[1])
    assert not torch.equal(a, grid_partition((16, 16), key=mix_key(8))[1])


def test_grid_smaller_than_stride_is_a_clear_error():
    with pytest.raises(ValueError, match="smaller than the 2x2 merge stride"):
        grid_partition((1, 5), (2, 2))


def test_alternating_partition():
    src, dst = alternating_partition(5)
    assert src.tolist() == [0, 2, 4] and dst.tolist() == [1, 3]


# ------------------------------------------------------------------ plan and merge modes
def _pairs_plan(weights=None):
    # 6 tokens; 0 -> 1, 3 -> 2, 5 -> 2 ; kept 1, 2, 4 in original order
    return plan_from_pairs(6, torch.tensor([[0, 3, 5]]), torch.tensor([[1, 2, 2]]), weights)


def test_plan_merge_modes_by_hand():
    x = torch.arange(12.0).view(1, 6, 2)
    plan = _pairs_plan()
    assert plan.kept_idx.tolist() == [[1, 2, 4]]
    assert plan.assignment.tolist() == [[0, 0, 1, 1, 2, 1]]
    assert torch.equal(plan.merge(x, "prune"), x[:, [1, 2, 4]])
    expected_mean = torch.stack([(x[0, 0] + x[0, 1]) / 2, (x[0, 2] + x[0, 3] + x[0, 5]) / 3, x[0, 4]])
    assert torch.allclose(plan.merge(x, "mean")[0], expected_mean)
    assert torch.allclose(plan.merge(x, "size_weighted")[0], expected_mean)
    weighted = _pairs_plan(torch.tensor([[1.0, 3.0, 1.0, 1.0, 1.0, 2.0]])).merge(x, "size_weighted")[0]
    assert torch.allclose(weighted[0], (x[0, 0] + 3 * x[0, 1]) / 4)
    assert torch.allclose(weighted[1], (x[0, 2] + x[0, 3] + 2 * x[0, 5]) / 4)
    # unmerge copies every slot back to all of its tokens
    y = plan.merge(x, "prune")
    assert torch.equal(plan.unmerge(y)[0], y[0, [0, 0, 1, 1, 2, 1]])
    assert plan.merge_sizes(torch.ones(1, 6)).tolist() == [[2.0, 3.0, 1.0]]


def test_plan_rejects_wrong_shapes():
    plan = _pairs_plan()
    with pytest.raises(ValueError, match="computed for"):
        plan.merge(torch.randn(1, 5, 2))
    with pytest.raises(ValueError, match="unmerge expects 3 tokens"):
        plan.unmerge(torch.randn(1, 4, 2))


def test_mlerp_keeps_the_largest_norm_and_is_slerp_midpoint():
    torch.manual_seed(0)
    group = torch.randn(4, 3, 8) * torch.tensor([1.0, 5.0, 2.0]).view(1, 3, 1)
    out = mlerp(group)
    assert torch.allclose(out.norm(dim=-1), group.norm(dim=-1).amax(dim=-1), rtol=1e-5)
    # two equal-norm tokens: SLERP's midpoint
    theta = 1.1
    a = torch.tensor([2.0, 0.0])
    b = torch.tensor([2.0 * math.cos(theta), 2.0 * math.sin(theta)])
    slerp_mid = (math.sin(theta / 2) / math.sin(theta)) * (a + b)
    assert torch.allclose(mlerp(torch.stack([a, b])), slerp_mid, atol=1e-6)
    # tokens that cancel do not produce inf/nan
    assert torch.isfinite(mlerp(torch.stack([a, -a]))).all()


def test_plan_mlerp_mode_matches_group_formula():
    torch.manual_seed(1)
    x = torch.randn(1, 6, 4)
    out = _pairs_plan().merge(x, "mlerp")[0]
    assert torch.allclose(out[0], mlerp(x[0, [0, 1]]), atol=1e-6)
    assert torch.allclose(out[1], mlerp(x[0, [2, 3, 5]]), atol=1e-6)
    assert torch.equal(out[2], x[0, 4])  # a token that merged with nothing is untouched


# ------------------------------------------------------------------ ToMe matching vs tomesd
@pytest.mark.parametrize("h,w", [(8, 8), (7, 9), (12, 10)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_tome_fixed_destinations_reproduce_tomesd(h, w, ratio):
    tomesd_merge = pytest.importorskip("tomesd.merge")
    torch.manual_seed(0)
    x = torch.randn(3, h * w, 16)
    r = int(h * w * ratio)
    merge, unmerge = tomesd_merge.bipartite_soft_matching_random2d(x, w, h, 2, 2, r, no_rand=True)
    src, dst = grid_partition((h, w), (2, 2))
    plan = bipartite_soft_matching(x, src, dst, r)
    ours = plan.merge(x, "mean")
    assert torch.equal(ours, merge(x))
    y = torch.tanh(ours * 3)  # any token-wise sublayer
    assert torch.equal(plan.unmerge(y), unmerge(y))


def test_bipartite_caps_r_and_protects_tokens():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4)
    src, dst = alternating_partition(9)
    protected = torch.zeros(9, dtype=torch.bool)
    protected[0] = True
    plan = bipartite_soft_matching(x, src, dst, 100, protected=protected, order="original")
    assert plan.num_merged == 4  # 5 sources, one protected
    assert (plan.kept_idx[:, 0] == 0).all()  # CLS stays first and is never merged away
    assert not (plan.src_idx == 0).any()
    assert bipartite_soft_matching(x, src, dst, 0) is None


def test_bipartite_merges_most_similar_pairs():
    # sources 0, 2 ; destinations 1, 3 ; token 2 is a copy of 3, token 0 is orthogonal to both
    x = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 1.0]]])
    plan = bipartite_soft_matching(x, torch.tensor([0, 2]), torch.tensor([1, 3]), 1)
    assert plan.src_idx.tolist() == [[2]]
    assert plan.kept_idx[0, plan.src_slot[0, 0]].item() == 3


# ------------------------------------------------------------------ MCTF
def _mctf_example():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.8, 0.6], [-1.0, 0.0]]])
    attn = torch.tensor([[0.1, 0.2, 0.125, 0.2, 0.25, 0.125]])
    src, dst = alternating_partition(6)
    return x, attn, src, dst


def test_mctf_scores_hand_checked():
    x, attn, src, dst = _mctf_example()
    scores = mctf_scores(x, src, dst, attn, None, tau_sim=1, tau_info=1, tau_size=1)
    # W_sim = (1 + cos) / 2 ; a~ = min(a) / a = [1, .5, .8, .5, .4, .8] ; W_info = a~_i a~_j
    expected = torch.tensor([[[0.5, 0.25, 0.0], [0.2, 0.4, 0.32], [0.18, 0.16, 0.032]]])
    assert torch.allclose(scores, expected, atol=1e-6)
    # tau = 0 switches a criterion off; the similarity term alone remains
    sim_only = mctf_scores(x, src, dst, attn, None, tau_sim=1, tau_info=0, tau_size=0)
    assert torch.allclose(sim_only, torch.tensor([[[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.9, 0.8, 0.1]]]), atol=1e-6)
    # larger tau flattens a criterion towards 1
    flat = mctf_scores(x, src, dst, attn, None, tau_sim=1, tau_info=1000, tau_size=0)
    assert torch.allclose(flat, sim_only, atol=2e-3)


def test_mctf_bidirectional_matching_hand_checked():
    x, attn, src, dst = _mctf_example()
    scores = mctf_scores(x, src, dst, attn, None, tau_sim=1, tau_info=1, tau_size=1)
    plan = bidirectional_matching(scores, src, dst, 6, r=3, weights=attn)
    # step 1 (r//2 = 1, A->B): token 0 (score .5) -> token 1
    # step 2 (2, B->A, token 0 no longer a target): token 3 (.4) and token 5 (.32) -> token 2
    assert plan.kept_idx.tolist() == [[1, 2, 4]]
    assert plan.assignment.tolist() == [[0, 0, 1, 1, 2, 1]]
    fused = plan.merge(x, "size_weighted")[0]
    assert torch.allclose(fused[0], (0.1 * x[0, 0] + 0.2 * x[0, 1]) / 0.3)
    assert torch.allclose(fused[1], (0.125 * x[0, 2] + 0.2 * x[0, 3] + 0.125 * x[0, 5]) / 0.45)


def test_mctf_chain_a_to_b_to_a_resolves():
    scores = torch.tensor([[[0.9, 0.1], [0.8, 0.3]]])  # A = {0, 2}, B = {1, 3}
    plan = bidirectional_matching(scores, torch.tensor([0, 2]), torch.tensor([1, 3]), 4, r=2)
    # 0 -> 1 first; then 1 -> 2 (best unmerged A); so 0 ends in 2's slot as well
    assert plan.kept_idx.tolist() == [[2, 3]]
    assert plan.assignment.tolist() == [[0, 0, 0, 1]]


def test_attention_received_matches_explicit_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    got = attention_received(q, k, num_heads=2)
    qh, kh = q.view(2, 5, 2, 4).transpose(1, 2), k.view(2, 7, 2, 4).transpose(1, 2)
    expected = torch.softmax(qh @ kh.transpose(-1, -2) / 2.0, dim=-1).mean(dim=(1, 2))
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(dim=1), torch.ones(2))


def test_reduction_cost_model():
    from tofu_diffusion.core.cost import reduction_pays

    full = ("self_attention", "cross_attention", "feed_forward")
    # SD 1.5 full resolution (4096 tokens, 320 channels, 1024 destinations)
    assert reduction_pays(4096, 320, 2048, 1024, ("self_attention",))
    assert reduction_pays(4096, 320, 410, 1024, full)  # ratio 0.1 pays
    assert not reduction_pays(4096, 320, 40, 1024, full)  # ratio 0.01 does not
    assert not reduction_pays(4096, 320, 0, 1024, full)
    # the break-even ratio is lower when more of the block runs on the reduced tokens
    r_attn = next(r for r in range(1, 4096) if reduction_pays(4096, 320, r, 1024, ("self_attention",)))
    r_block = next(r for r in range(1, 4096) if reduction_pays(4096, 320, r, 1024, full))
    assert r_block < r_attn < 0.06 * 4096


@pytest.mark.parametrize("h,w,q", [(16, 16, 16), (12, 20, 16), (7, 9, 16), (3, 50, 8), (4, 4, 64)])
def test_stratified_grid_queries_cover_the_grid(h, w, q):
    from tofu_diffusion.core import stratified_grid_queries

    index, weight = stratified_grid_queries((h, w), q, torch.Generator().manual_seed(0))
    assert torch.isclose(weight.sum(), torch.tensor(1.0))
    assert index.unique().numel() == index.numel() <= h * w
    rows, cols = index // w, index % w
    assert min(q, h * w) / 2 <= index.numel() <= 2 * q
    # spread over the image in both directions, not along one column or row
    assert rows.max() - rows.min() >= (h - 1) / 2 and cols.max() - cols.min() >= (w - 1) / 2
    again, _ = stratified_grid_queries((h, w), q, torch.Generator().manual_seed(0))
    assert torch.equal(index, again)


@pytest.mark.parametrize("protect", [(0,), (0, 1)])
def test_sets_order_is_protected_then_unmerged_sources_then_destinations(protect):
    from tofu_diffusion.core import alternating_partition, bidirectional_matching, mctf_scores

    n = 11
    protected = torch.zeros(n, dtype=torch.bool)
    protected[list(protect)] = True
    src, dst = alternating_partition(n)
    metric = torch.randn(2, n, 8, generator=torch.Generator().manual_seed(0))
    plan = bipartite_soft_matching(metric, src, dst, 3, protected=protected, order="sets")
    for kept, merged in zip(plan.kept_idx.tolist(), plan.src_idx.tolist()):
        rest = kept[len(protect):]
        sources = [t for t in src.tolist() if t not in merged and t not in protect]
        destinations = [t for t in dst.tolist() if t not in protect]
        assert kept[:len(protect)] == list(protect) and rest == sources + destinations
    # MCTF: the A tokens left after step 1 by index, then the B tokens left after step 2 (by score)
    scores = mctf_scores(metric, src, dst, protected=protected)
    plan = bidirectional_matching(scores, src, dst, n, 4, protected_rows=True, order="sets", protected=protected)
    original = bidirectional_matching(scores, src, dst, n, 4, protected_rows=True)
    for kept, same_tokens in zip(plan.kept_idx.tolist(), original.kept_idx.tolist()):
        assert sorted(kept) == sorted(same_tokens) and kept[:len(protect)] == list(protect)
        a_part = [t for t in kept[len(protect):] if t % 2 == 0]
        assert a_part == sorted(a_part) and kept[len(protect):len(protect) + len(a_part)] == a_part
    with pytest.raises(ValueError, match="unknown token order"):
        bipartite_soft_matching(metric, src, dst, 3, order="sorted")
