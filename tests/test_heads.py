"""flagcore.heads: the head-overlap score R (Eq. 10/12), its Haar baseline (spec A.14) and model profiles."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flagcore import frobenius_overlap, haar_frames
from flagcore.heads import (
    haar_overlap_baseline,
    haar_overlap_samples,
    head_overlap,
    overlap_matrix,
    overlap_profile,
    query_heads,
)


def _pair_loop(W):
    """Brute force over ordered pairs with flagcore.frobenius_overlap (an independent path: SVD bases per pair)."""
    H, d, k = W.shape
    total = sum(float(frobenius_overlap(W[i], W[j])) for i in range(H) for j in range(H) if i != j)
    return total / (H * (H - 1) * k)


def _haar_orthogonal(d, g):
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


@given(H=st.integers(2, 5), d=st.integers(4, 12), seed=st.integers(0, 10**6))
def test_batched_R_equals_pair_loop_and_is_invariant(H, d, seed):
    """Spec Test A.14 items 2-3: R in [0, 1]; unchanged under Q_h -> Q_h G_h (any G_h in GL(d_k), as R depends
    on column spaces only) and a global O in O(d); changed by a general G in GL(d)."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, d // 3)
    W = torch.randn(H, d, k, generator=g, dtype=torch.float64)
    R = float(head_overlap(W))
    assert abs(R - _pair_loop(W)) < 1e-12
    assert -1e-12 <= R <= 1 + 1e-12
    O = overlap_matrix(W)
    assert torch.allclose(O, O.T, atol=1e-12) and torch.allclose(torch.diagonal(O), torch.ones(H, dtype=W.dtype), atol=1e-12)
    assert abs((O.sum() - O.trace()).item() / (H * (H - 1)) - R) < 1e-12
    right = torch.randn(H, k, k, generator=g, dtype=torch.float64)
    assert abs(float(head_overlap(W @ right)) - R) < 1e-9
    Og = _haar_orthogonal(d, g)
    assert abs(float(head_overlap(Og @ W)) - R) < 1e-12
    G = torch.randn(d, d, generator=g, dtype=torch.float64) + 3 * torch.diag(torch.rand(d, generator=g, dtype=torch.float64))
    if k < d:  # negative control: a general change of coordinates moves R (Cor 4.2); R = 1 when k = d
        assert abs(float(head_overlap(G @ W)) - R) > 1e-6


def test_extremes_identical_heads_and_blocks_of_one_orthogonal_matrix(gen):
    Q = haar_frames(12, 3, 1, gen)[0]
    same = torch.stack([Q @ torch.randn(3, 3, generator=gen, dtype=torch.float64) for _ in range(4)])
    assert abs(float(head_overlap(same)) - 1) < 1e-12
    O = _haar_orthogonal(12, gen)
    blocks = O.reshape(12, 4, 3).transpose(0, 1)  # 4 mutually orthogonal heads
    assert abs(float(head_overlap(blocks))) < 1e-14  # the pitfall of spec A.14: R = 0, not d_k/d


def test_batched_over_layers_and_float32(gen):
    W = torch.randn(3, 5, 20, 4, generator=gen, dtype=torch.float64)
    R = head_overlap(W)
    assert R.shape == (3,)
    for i in range(3):
        assert abs(float(R[i]) - _pair_loop(W[i])) < 1e-12
    assert overlap_matrix(W).shape == (3, 5, 5)
    # H*d_k > d takes the d x d Gram branch: same answer
    wide = torch.randn(6, 8, 3, generator=gen, dtype=torch.float64)
    assert abs(float(head_overlap(wide)) - _pair_loop(wide)) < 1e-12
    assert abs(float(head_overlap(W.float()[0])) - float(R[0])) < 1e-5


def test_haar_baseline_closed_form():
    """E[R] = d_k/d exactly; sd = 2(d-d_k)/(d sqrt(H(H-1)(d-1)(d+2))): spec A.14's numbers."""
    gpt2 = haar_overlap_baseline(768, 64, 12)
    assert gpt2.mean == 64 / 768 and abs(gpt2.sd - 2.08e-4) < 0.01e-4
    llama = haar_overlap_baseline(2048, 64, 32)
    assert llama.mean == 1 / 32 and abs(llama.sd - 3.0e-5) < 0.1e-5
    assert abs(haar_overlap_baseline(1024, 64, 16).mean - 0.0625) == 0
    assert gpt2.z(gpt2.mean + 3 * gpt2.sd) == pytest.approx(3.0)
    # the single-pair variance it is built from: spec's (64, 8, 8) -> 0.02357 (tr(P_i P_j) variance)
    # (with H = 2, R = tr(P_1 P_2)/d_k, so Var R * d_k^2 is the single-pair variance)
    b = haar_overlap_baseline(64, 8, 2)
    assert abs(b.sd**2 * 8**2 - 0.02357) < 1e-5


def test_haar_baseline_empirically(gen):
    """Monte Carlo with independent Haar frames: mean within 4 standard errors of d_k/d, and the sample sd within
    10% of the analytic sd (n = 3000; the sd's relative standard error is ~1.3%)."""
    for d, k, H in [(32, 4, 4), (48, 8, 6)]:
        b = haar_overlap_baseline(d, k, H)
        R = haar_overlap_samples(d, k, H, 3000, gen)
        assert abs(R.mean().item() - b.mean) < 4 * b.sd / math.sqrt(3000)
        assert abs(R.std().item() / b.sd - 1) < 0.1
    # negative control: the wrong (pairwise, not mean-of-pairs) sd is far off
    wrong_sd = math.sqrt(2 * 4**2 * 28**2 / (32**2 * 31 * 34)) / 4
    assert abs(haar_overlap_samples(32, 4, 4, 3000, gen).std().item() / wrong_sd - 1) > 0.2


def test_haar_samples_in_chunks_keep_the_law(gen, monkeypatch):
    """Drawn in many small chunks (as a large n is), the samples keep their count, their independence
    and the exact mean and sd of the baseline."""
    import flagcore.heads as heads_module

    monkeypatch.setattr(heads_module, "_SAMPLE_CHUNK_BYTES", 200_000)  # 10 draws of (48, 8, 6) per chunk
    b = haar_overlap_baseline(48, 8, 6)
    R = haar_overlap_samples(48, 8, 6, 3000, gen)
    assert R.shape == (3000,) and len(set(R.tolist())) == 3000
    assert abs(R.mean().item() - b.mean) < 4 * b.sd / math.sqrt(3000)
    assert abs(R.std().item() / b.sd - 1) < 0.1


def test_random_init_gpt2_shaped_weights_sit_at_the_baseline(gen):
    """Spec Test A.16 item 1: i.i.d. N(0, 0.02^2) c_attn query blocks, 12 layers x 12 heads, d = 768: mean R =
    1/12 within 4 standard errors (sd/sqrt(12) = 6e-5), every layer within 5 sd."""
    b = haar_overlap_baseline(768, 64, 12)
    W = 0.02 * torch.randn(12, 768, 768, generator=gen).reshape(12, 768, 12, 64).transpose(1, 2)
    R = head_overlap(W.double())
    assert abs(R.mean().item() - 1 / 12) < 4 * b.sd / math.sqrt(12)
    assert ((R - b.mean).abs() < 5 * b.sd).all()


def test_shared_head_construction_tends_to_one(gen):
    """W_h = S + eps N_h: R -> 1 as eps -> 0, with 1 - R = O(eps^2)."""
    S = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    N = torch.randn(6, 64, 8, generator=gen, dtype=torch.float64)
    gaps = [1 - float(head_overlap(S + eps * N)) for eps in (1e-1, 1e-2, 1e-3)]
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert 50 < gaps[0] / gaps[1] < 200 and 50 < gaps[1] / gaps[2] < 200
    assert float(head_overlap(S + 10 * N)) < 0.3  # large noise: back near d_k/d = 0.125


def test_bad_input(gen):
    with pytest.raises(ValueError, match="at least 2 heads"):
        head_overlap(torch.randn(1, 8, 2, generator=gen))
    with pytest.raises(ValueError, match=r"\[\.\.\., H, d, d_k\]"):
        head_overlap(torch.randn(8, 2, generator=gen))
    W = torch.randn(3, 8, 2, generator=gen)
    W[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        overlap_matrix(W)
    W = torch.randn(3, 8, 2, generator=gen, dtype=torch.float64)
    W[2, :, 1] = W[2, :, 0]  # one rank-deficient head
    with pytest.raises(ValueError, match="rank differs"):
        head_overlap(W)
    with pytest.raises(TypeError):
        head_overlap([[1.0]])
    with pytest.raises(ValueError, match="1 <= d_k <= d"):
        haar_overlap_baseline(8, 9, 2)
    with pytest.raises(ValueError, match="at least 2 heads"):
        haar_overlap_baseline(8, 2, 1)
    with pytest.raises(TypeError):
        haar_overlap_baseline(8.0, 2, 2)
    with pytest.raises(ValueError, match="n must be"):
        haar_overlap_samples(8, 2, 2, 0)


def test_profile_of_a_tiny_model_matches_per_layer_R():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=3, n_positions=8, vocab_size=11))
    prof = overlap_profile(model, dtype=torch.float64)
    assert (prof.d, prof.H, prof.H_kv, prof.d_k, prof.layers) == (32, 4, 4, 8, [0, 1, 2])
    for (layer, W), R in zip(query_heads(model, dtype=torch.float64), prof.R):
        assert abs(_pair_loop(W) - R) < 1e-12
    sel = overlap_profile(model, [2], dtype=torch.float64)
    assert sel.layers == [2] and sel.R == [prof.R[2]]
    prof32 = overlap_profile(model)  # layers computed together (float32 sums in another order): equal to rounding
    assert max(abs(a - float(head_overlap(W))) for a, (_, W) in zip(prof32.R, query_heads(model))) < 1e-6
    assert max(abs(a - b) for a, b in zip(prof32.R, prof.R)) < 1e-6
    out = prof.to_dict()
    assert out["baseline"] == 8 / 32 and out["layers"][1]["excess"] == pytest.approx(prof.R[1] - 0.25)


def test_whitened_gram_fast_path_equals_svd_bases_and_falls_back_on_rank_deficiency():
    """The Cholesky-whitened raw Gram (fast path) gives the same R as explicit SVD bases; a rank-deficient
    head takes the SVD route instead of producing garbage (negative control for the fast path)."""
    from flagcore.heads import _orthonormal_heads
    from flagcore.subspace import orthonormal_basis

    g = torch.Generator().manual_seed(3)
    W = torch.randn(5, 40, 6, generator=g, dtype=torch.float64)
    W = W @ torch.diag(torch.logspace(0, 3, 6, dtype=torch.float64))  # cond 1e3 per head: still fast path
    Q = orthonormal_basis(W)
    R_svd = head_overlap(Q, assume_orthonormal=True)
    assert torch.allclose(head_overlap(W), R_svd, rtol=0, atol=1e-12)
    _, gram, r = _orthonormal_heads(W, False, groups=1)
    assert r == 6 and torch.allclose(torch.diagonal(gram[0]), torch.ones(30, dtype=torch.float64), atol=1e-12)

    deficient = W.clone()
    deficient[..., -1] = deficient[..., 0]  # every head has rank 5
    R_def = head_overlap(deficient)
    R_ref = head_overlap(orthonormal_basis(deficient), assume_orthonormal=True)
    assert torch.allclose(R_def, R_ref, atol=1e-12)
    assert _orthonormal_heads(deficient, False, groups=1)[2] == 5

    zero = W.clone()
    zero[..., -1] = 0.0  # an exactly zero column: Cholesky itself fails (info > 0), so the SVD route must be taken
    assert bool((torch.linalg.cholesky_ex(zero.mT @ zero).info > 0).all())
    R_zero = head_overlap(zero)
    assert torch.allclose(R_zero, head_overlap(orthonormal_basis(zero), assume_orthonormal=True), atol=1e-12)
    assert _orthonormal_heads(zero, False, groups=1)[2] == 5


def test_float32_path_orthonormalises_in_float64_and_keeps_seven_digits():
    """Float32 weights: the per-head Cholesky runs in float64 and only the Gram product in float32, so R
    agrees with float64 SVD bases of the same (float32-rounded) weights to 1e-6 even for heads with
    cond(W_h) = 1e3, where whitening a raw float32 Gram would lose ~cond^2 * eps32 ~ 0.1 (negative control)."""
    from flagcore.heads import _diagonal_blocks
    from flagcore.subspace import orthonormal_basis

    g = torch.Generator().manual_seed(12)
    O = torch.linalg.qr(torch.randn(6, 8, 8, generator=g, dtype=torch.float64)).Q  # mix: near-collinear columns
    W = torch.randn(6, 96, 8, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, 3, 8, dtype=torch.float64)) @ O
    W32 = W.float()
    ref = float(head_overlap(orthonormal_basis(W32.double()), assume_orthonormal=True))
    R32 = head_overlap(W32)
    assert R32.dtype == torch.float32 and abs(float(R32) - ref) < 1e-6
    # negative control: raw float32 Gram, whitened by float32 Cholesky factors of its own diagonal blocks
    F = W32.transpose(1, 2).reshape(48, 96)
    G = F @ F.T
    M = torch.linalg.inv(torch.linalg.cholesky(_diagonal_blocks(G, 6, 8)))
    Gw = torch.einsum("iab,ibjc,jdc->iajd", M, G.reshape(6, 8, 6, 8), M).reshape(48, 48)
    raw = float((Gw.square().sum() - _diagonal_blocks(Gw, 6, 8).square().sum()) / (8 * 6 * 5))
    assert abs(raw - ref) > 1e-5


def test_second_cholesky_pass_equals_explicit_whitening(gen):
    """_whiten_blocks (two batched products) equals the block formula M_i G_ij M_j^T written as an einsum."""
    from flagcore.heads import _whiten_blocks

    H, k = 4, 3
    G = torch.randn(H * k, H * k, generator=gen, dtype=torch.float64)
    M = torch.randn(H, k, k, generator=gen, dtype=torch.float64)
    want = torch.einsum("iab,ibjc,jdc->iajd", M, G.reshape(H, k, H, k), M).reshape(H * k, H * k)
    torch.testing.assert_close(_whiten_blocks(G, M), want, rtol=1e-13, atol=1e-13)
    batched = _whiten_blocks(torch.stack([G, 2 * G]), torch.stack([M, M]))
    torch.testing.assert_close(batched[1], 2 * want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("H", [2, 7, 9, 12, 16, 32])
def test_block_triangle_gram_equals_the_full_gram(gen, H):
    """The off-diagonal sum of squares from G group Grams plus the products above the block diagonal
    equals that of the full Gram product (brute force), for every divisor G of H and a batch of layers."""
    from flagcore.heads import _cross_group_squares, _diagonal_blocks, _gram_groups, _grouped_gram

    k, d = 3, 40
    rows = torch.randn(2, H * k, d, generator=gen, dtype=torch.float64)
    full = rows @ rows.mT
    want = full.square().sum(dim=(-2, -1)) - _diagonal_blocks(full, H, k).square().sum(dim=(-3, -2, -1))
    for groups in [g for g in range(1, H + 1) if H % g == 0]:
        gram = _grouped_gram(rows, groups)
        within = gram.square().sum(dim=(-3, -2, -1)) - _diagonal_blocks(gram, H // groups, k).square().sum(dim=(-4, -3, -2, -1))
        torch.testing.assert_close(within + 2 * _cross_group_squares(rows, groups), want, rtol=1e-12, atol=0)
        single = _cross_group_squares(rows[1], groups)  # one layer: the buffered path
        torch.testing.assert_close(single, _cross_group_squares(rows, groups)[1], rtol=1e-12, atol=0)
    assert H % _gram_groups(H) == 0 and 1 <= _gram_groups(H) <= 8
    assert _gram_groups(12) == 6 and _gram_groups(9) == 3 and _gram_groups(32) == 8 and _gram_groups(7) == 7


def test_second_cholesky_pass_restores_orthonormality_in_float32():
    """float32 heads with cond(W_h) = 5e3: one Cholesky-QR pass leaves ||Q^T Q - I|| ~ eps32 cond^2 above the
    1e-5 tolerance (checked here: the negative control), so the second pass runs; its rows are orthonormal to
    1e-5 and R agrees with float64 SVD bases of the same weights to 1e-6."""
    from flagcore.heads import _diagonal_blocks, _orthonormal_heads
    from flagcore.subspace import orthonormal_basis

    g = torch.Generator().manual_seed(5)
    O = torch.linalg.qr(torch.randn(4, 8, 8, generator=g, dtype=torch.float64)).Q
    scales = torch.diag(torch.logspace(0, 3.7, 8, dtype=torch.float64))
    W = (torch.randn(4, 200, 8, generator=g, dtype=torch.float64) @ scales @ O).float()
    Wt = W.mT
    L = torch.linalg.cholesky((Wt @ Wt.mT).double())
    one_pass = torch.linalg.solve_triangular(L, torch.eye(8, dtype=torch.float64).expand_as(L), upper=False).float() @ Wt
    assert float((one_pass @ one_pass.mT - torch.eye(8)).abs().amax()) > 1e-5  # the first pass alone fails
    rows, gram, r = _orthonormal_heads(W, False, groups=2)
    assert r == 8 and float((_diagonal_blocks(gram, 2, 8) - torch.eye(8)).abs().amax()) <= 1e-5
    ref = float(head_overlap(orthonormal_basis(W.double()), assume_orthonormal=True))
    assert abs(float(head_overlap(W)) - ref) < 1e-6


def test_finiteness_check_is_exact():
    """A finite sum proves finiteness; a sum that overflows on finite entries is re-checked element-wise
    (no false alarm), and NaN / Inf anywhere is caught."""
    from flagcore.heads import _all_finite

    huge = torch.full((3, 4, 2), 3e38, dtype=torch.float32)  # finite entries, the float32 sum overflows
    assert not torch.isfinite(huge.sum()) and _all_finite(huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        W = torch.ones(3, 4, 2)
        W[2, 3, 1] = bad
        assert not _all_finite(W)
    W = torch.ones(3, 4, 2)
    W[0, 0, 0], W[1, 0, 0] = float("inf"), -float("inf")  # inf - inf = nan in the sum: still caught
    assert not _all_finite(W)


def test_layout_null_is_haar_for_plain_heads_and_not_for_latent_ones():
    """Monte Carlo over random weights cut by the layout: Llama's row blocks give the Haar law (mean
    d_k/d within 4 standard errors); DeepSeek's latent queries (rank-32 space in R^64) lie far above it."""
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    from families import build

    from flagcore.heads import haar_overlap_baseline, layout_null_samples
    from flagcore.weights import open_source

    g = torch.Generator().manual_seed(0)
    plain = layout_null_samples(open_source(build("llama")), 0, "q", 200, g)
    b = haar_overlap_baseline(64, 16, 4)
    assert abs(plain.mean().item() - b.mean) < 4 * b.sd / 200**0.5
    latent = layout_null_samples(open_source(build("deepseek_v3")), 0, "q", 200, g)
    assert latent.mean().item() > haar_overlap_baseline(64, 24, 4).mean + 50 * latent.std().item() / 200**0.5


def _ill_conditioned_heads(g: torch.Generator, H: int, d: int, k: int, log_cond: float) -> torch.Tensor:
    O = torch.linalg.qr(torch.randn(H, k, k, generator=g, dtype=torch.float64)).Q
    scales = torch.diag(torch.logspace(0, log_cond, k, dtype=torch.float64))
    return torch.randn(H, d, k, generator=g, dtype=torch.float64) @ scales @ O


@pytest.mark.parametrize("H", [2, 7, 9, 12])
def test_layers_computed_together_equal_head_overlap_one_by_one(gen, H):
    """overlap_profile's path (every layer's small operations done together, the upper block rows of
    each layer's Gram written by one product per group) against head_overlap per layer: float64 to 1e-12,
    float32 to 1e-6; a chunk of one layer gives the same numbers as a chunk of four."""
    from flagcore.heads import _overlap_of_layers

    Ws = [torch.randn(H, 40, 3, generator=gen, dtype=torch.float64) for _ in range(4)]
    together = _overlap_of_layers(Ws)
    assert max(abs(R - float(head_overlap(W))) for R, W in zip(together, Ws)) < 1e-12
    assert [_overlap_of_layers([W])[0] for W in Ws] == pytest.approx(together, abs=1e-14)
    W32 = [W.float() for W in Ws]
    assert max(abs(R - float(head_overlap(W))) for R, W in zip(_overlap_of_layers(W32), W32)) < 1e-6


def test_layers_computed_together_fall_back_per_layer(gen, monkeypatch):
    """A chunk mixing a plain layer, one whose float32 Gram loses orthonormality (cond(W_h) = 316), one of
    rank-deficient heads and one with a NaN: the second is redone with float64 head Grams, the third
    through head_overlap's SVD route, the fourth raises; each value equals float64 SVD bases to 1e-6.
    The calls are counted, so a fallback that silently stopped running would fail the test."""
    import flagcore.heads as heads_module
    from flagcore.subspace import orthonormal_basis

    plain = torch.randn(4, 200, 8, generator=gen, dtype=torch.float64)
    rough = _ill_conditioned_heads(gen, 4, 200, 8, 2.5)
    deficient = plain.clone()
    deficient[..., -1] = deficient[..., 0]
    chunk = [W.float() for W in (plain, rough, deficient)]
    calls = {"exact_gram": 0, "guarded": 0}
    real_layers, real_single = heads_module._overlap_of_layers, heads_module._head_overlap

    def layers(Ws, *, exact_gram=False):
        calls["exact_gram"] += exact_gram
        return real_layers(Ws, exact_gram=exact_gram)

    def single(W, *args, **kwargs):
        calls["guarded"] += 1
        return real_single(W, *args, **kwargs)

    monkeypatch.setattr(heads_module, "_overlap_of_layers", layers)
    monkeypatch.setattr(heads_module, "_head_overlap", single)
    got = heads_module._overlap_of_layers(chunk)
    assert calls == {"exact_gram": 1, "guarded": 1}
    for R, W in zip(got, chunk):
        ref = float(head_overlap(orthonormal_basis(W.double()), assume_orthonormal=True))
        assert abs(R - ref) < 1e-6
    broken = chunk[0].clone()
    broken[1, 5, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        heads_module._overlap_of_layers([chunk[0], broken])


def test_profile_names_a_layer_with_nan_queries_and_ignores_nan_keys():
    """The profile reads query weights without a separate finiteness pass (its Cholesky guard sees a NaN):
    a NaN among layer 1's query weights is still reported with its tensor and layer; a NaN among the key
    weights of the same fused tensor does not touch R, so the profile runs (and chunks of one layer agree
    with one chunk of three)."""
    transformers = pytest.importorskip("transformers")
    import flagcore.heads as heads_module

    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=3, n_positions=8, vocab_size=11))
    clean = overlap_profile(model).R
    with torch.no_grad():
        model.h[1].attn.c_attn.weight[3, 40] = float("nan")  # columns 32..63: keys
    assert overlap_profile(model).R == clean
    with torch.no_grad():
        model.h[1].attn.c_attn.weight[3, 5] = float("nan")  # columns 0..31: queries
    with pytest.raises(ValueError, match=r"h\.1\.attn\.c_attn\.weight \(layer 1\) contains NaN"):
        overlap_profile(model)
    with torch.no_grad():
        model.h[1].attn.c_attn.weight[3, 5] = 0.0
        model.h[1].attn.c_attn.weight[3, 40] = 0.0
    one = overlap_profile(model).R
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(heads_module, "_LAYER_CHUNK_BYTES", 1)
        assert overlap_profile(model).R == pytest.approx(one, abs=1e-7)


# --------------------------------------------------------------------------- rise statistics of a series over training


def test_rise_statistics_against_scipy_and_brute_force(gen):
    from scipy.stats import spearmanr

    from flagcore.heads import rise_statistics

    for n in (2, 5, 14, 40):
        steps = torch.randperm(1000, generator=gen)[:n].sort().values
        values = torch.randn(n, generator=gen, dtype=torch.float64)
        shuffled = torch.randperm(n, generator=gen)  # the order given must not matter
        got = rise_statistics(steps[shuffled].tolist(), values[shuffled])
        v = values.tolist()
        assert got["up"] == pytest.approx(sum(b > a for a, b in zip(v, v[1:])) / (n - 1), abs=0)
        assert got["rho"] == pytest.approx(spearmanr(steps, values).statistic, abs=1e-12)
        assert got["drop"] == pytest.approx(max(max(v[: i + 1]) - v[i] for i in range(n)), abs=0)
    up = rise_statistics([0, 1, 2, 4], [0.1, 0.2, 0.25, 0.3])
    assert up == {"up": 1.0, "rho": pytest.approx(1.0), "drop": 0.0}
    down = rise_statistics([0, 1, 2, 4], [0.3, 0.2, 0.25, 0.1])  # negative control: mostly falling
    assert down["up"] == pytest.approx(1 / 3) and down["rho"] == pytest.approx(-0.8) and down["drop"] == pytest.approx(0.2)
    assert math.isnan(rise_statistics([0, 1, 2], [1.0, 1.0, 1.0])["rho"])
    with pytest.raises(ValueError, match="length"):
        rise_statistics([0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        rise_statistics([0, 1], [1.0, float("nan")])
