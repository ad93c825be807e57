"""flagcore.collapse against independent oracles: numpy ranks, torch/HF layers, brute force, closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flagcore import collapse as C


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# --------------------------------------------------------------------------- affine rank / residual


@given(n=st.integers(2, 12), d=st.integers(1, 12), k=st.integers(0, 12), seed=st.integers(0, 10**6))
def test_affine_rank_of_points_on_a_k_flat(n, d, k, seed):
    gen = torch.Generator().manual_seed(seed)
    k = min(k, d, n - 1)
    X = randn(gen, 1, d) + randn(gen, n, k) @ randn(gen, k, d)
    expected = np.linalg.matrix_rank(np.hstack([X.numpy(), np.ones((n, 1))])) - 1  # rank[X 1] - 1
    assert C.affine_rank(X) == expected == k


def test_affine_rank_tolerance_is_relative_to_X_not_to_the_residual(gen):
    X = torch.ones(8, 1, dtype=torch.float64) @ randn(gen, 1, 5) * 1e3 + 1e-14 * randn(gen, 8, 5)
    assert C.affine_rank(X) == 0
    # negative control: a tolerance relative to ||C_n X|| would see noise as rank
    R = C.residual(X)
    assert np.linalg.matrix_rank(R.numpy()) > 0
    assert C.affine_rank(X, rtol=0.0) > 0


def test_affine_rank_batched_and_bad_input(gen):
    X = torch.stack([randn(gen, 6, 4), torch.ones(6, 1, dtype=torch.float64) @ randn(gen, 1, 4)])
    assert C.affine_rank(X).tolist() == [4, 0]
    with pytest.raises(TypeError):
        C.affine_rank(np.zeros((3, 3)))
    with pytest.raises(ValueError):
        C.affine_rank(torch.zeros(3))
    with pytest.raises(ValueError):
        C.affine_rank(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError):
        C.affine_rank(randn(gen, 3, 3), rtol=-1.0)


def test_residual_mean_is_centring_and_median_minimises_the_column_norm(gen):
    X = randn(gen, 9, 5)
    assert torch.allclose(C.residual(X), C.centering(9) @ X, atol=1e-14)
    Rm = C.residual(X, "median")
    one = lambda R: R.abs().sum(0).max().item()  # noqa: E731
    for _ in range(50):
        x = randn(gen, 1, 5) * 0.3 + X.median(0).values
        assert one(Rm) <= one(X - x) + 1e-12
    assert np.allclose(Rm.numpy(), X.numpy() - np.median(X.numpy(), axis=0), atol=1e-14)
    with pytest.raises(ValueError):
        C.residual(X, "max")


@given(n=st.integers(2, 10), d=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_mean_residual_within_factor_two_of_any_centre_in_the_composite_norm(n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    X = randn(gen, n, d) + randn(gen, 1, d) * 3
    mean_res = C.composite_norm(C.residual(X)).item()
    for _ in range(10):
        x = randn(gen, 1, d)
        assert mean_res <= 2 * (1 - 1 / n) * C.composite_norm(X - x).item() + 1e-12


def test_composite_norm_against_numpy_and_not_a_norm(gen):
    X = randn(gen, 7, 4)
    a = X.numpy()
    expected = math.sqrt(np.linalg.norm(a, 1) * np.linalg.norm(a, np.inf))
    assert C.composite_norm(X).item() == pytest.approx(expected, rel=1e-14)
    # triangle inequality fails (Dong et al. say so): a row of ones plus a column of ones, n = 4
    A = torch.zeros(4, 4, dtype=torch.float64)
    B = torch.zeros(4, 4, dtype=torch.float64)
    A[0] = 1.0
    B[:, 0] = 1.0
    assert C.composite_norm(A).item() == pytest.approx(2.0) and C.composite_norm(B).item() == pytest.approx(2.0)
    assert C.composite_norm(A + B).item() == pytest.approx(5.0)  # > 2 + 2
    # positive homogeneity does hold
    assert C.composite_norm(-3 * X).item() == pytest.approx(3 * expected, rel=1e-14)


def test_residual_ratio_zero_on_collapse_and_bad_input(gen):
    X = torch.ones(5, 1, dtype=torch.float64) @ randn(gen, 1, 3)
    for norm in ("1,inf", "fro", "2"):
        assert C.residual_ratio(X, norm=norm).item() < 1e-15
        assert C.residual_ratio(randn(gen, 5, 3), norm=norm).item() > 0.1
    with pytest.raises(ValueError):
        C.residual_ratio(torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError):
        C.residual_ratio(X, norm="nuc")


# --------------------------------------------------------------------------- paths


def test_path_count_closed_forms():
    for L in range(6):
        for H in (1, 2, 12):
            assert sum(C.path_count(L, H, k) for k in range(L + 1)) == C.path_count(L, H) == (1 + H) ** L
    assert C.path_count(12, 12, 12, skip=False) == 12**12 and C.path_count(3, 2, 1, skip=False) == 0
    with pytest.raises(ValueError):
        C.path_count(3, 0)
    with pytest.raises(ValueError):
        C.path_count(3, 2, 4)
    with pytest.raises(TypeError):
        C.path_count(2.5, 2)


@pytest.mark.parametrize("skip", [True, False])
def test_path_sum_equals_the_layerwise_recursion(gen, skip):
    L, H, n, d = 3, 2, 5, 4
    P = torch.softmax(randn(gen, L, H, n, n), dim=-1)
    W = randn(gen, L, H, d, d) * 0.5
    X = randn(gen, n, d)
    total, counts = C.path_sum(X, P, W, skip=skip)
    Y = X
    for layer in range(L):
        Y = (Y if skip else 0) + sum(P[layer, h] @ Y @ W[layer, h] for h in range(H))
    assert torch.allclose(total, Y, atol=1e-12)
    assert counts == {k: C.path_count(L, H, k, skip) for k in range(L + 1) if C.path_count(L, H, k, skip)}
    with pytest.raises(ValueError):
        C.path_sum(X, P[..., :3], W)


# --------------------------------------------------------------------------- LayerNorm


def test_layer_norm_matches_torch_and_matrix_form(gen):
    X, g, b = randn(gen, 6, 10), randn(gen, 10), randn(gen, 10)
    for eps in (0.0, 1e-5):
        ref = torch.nn.functional.layer_norm(X, (10,), g, b, eps)
        assert torch.allclose(C.layer_norm(X, g, b, eps), ref, atol=1e-13)
        D = torch.diag(C.layer_norm_scales(X, eps))
        mat = torch.linalg.inv(D) @ X @ C.centering(10) @ torch.diag(g) + torch.ones(6, 1, dtype=X.dtype) @ b[None]
        assert torch.allclose(mat, ref, atol=1e-13)
    with pytest.raises(ValueError):
        C.layer_norm(torch.ones(2, 3, dtype=torch.float64), eps=0.0)  # 0/0
    with pytest.raises(ValueError):
        C.layer_norm(X, g[:3])
    with pytest.raises(ValueError):
        C.layer_norm_scales(X, eps=-1.0)


def test_layer_norm_affine_rank_facts(gen):
    # F4: generic n <= d keeps affrank n-1; n >= d+1 loses one (the LN hyperplane)
    assert C.affine_rank(C.layer_norm(randn(gen, 16, 32))) == 15
    assert C.affine_rank(C.layer_norm(randn(gen, 40, 32))) == 31
    # F6: tokens on a 2-flat, n = 16 -> LN adds one dimension
    X = randn(gen, 1, 32) + randn(gen, 16, 2) @ randn(gen, 2, 32)
    assert C.affine_rank(X) == 2 and C.affine_rank(C.layer_norm(X)) == 3
    # F5: x_i = x_1 + c_i 1 collapses exactly under LN
    x1 = randn(gen, 1, 32)
    X = x1 + randn(gen, 16, 1) * torch.ones(1, 32, dtype=torch.float64)
    assert C.affine_rank(X) == 1 and C.affine_rank(C.layer_norm(X), rtol=1e-10) == 0


# --------------------------------------------------------------------------- BERT blocks against HF


def _tiny_hf_bert(gen):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        hidden_act="gelu", layer_norm_eps=1e-12, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model


def test_full_block_equals_hf_bert_layer(gen):
    model = _tiny_hf_bert(gen)
    layers = C.bert_layers_from_hf(model)
    assert len(layers) == 2 and layers[0].heads == 4 and layers[0].d_k == 6
    X = randn(gen, 7, 24)
    with torch.no_grad():
        ref = X[None]
        for hf_layer in model.encoder.layer:
            out = hf_layer(ref)
            ref = out[0] if isinstance(out, tuple) else out
        states = C.stack_forward(X, layers, "full")
    assert torch.allclose(states[-1], ref[0], atol=1e-10)
    # negative control: dropping the MLP changes the output
    assert not torch.allclose(C.stack_forward(X, layers, "san+skip+ln")[-1], ref[0], atol=1e-3)
    P = C.attention_probs(X, layers[0])
    assert P.shape == (4, 7, 7) and torch.allclose(P.sum(-1), torch.ones(4, 7, dtype=P.dtype))


def test_mha_heads_recombine_and_state_dict_prefix(gen):
    model = _tiny_hf_bert(gen)
    sd = {"bert." + k: v for k, v in model.state_dict().items()}
    layers = C.bert_layers_from_state_dict(sd, heads=4)
    X = randn(gen, 5, 24)
    out, Z = C.multi_head_attention(X, layers[1], return_heads=True)
    assert Z.shape == (4, 5, 6)
    assert torch.allclose(out, Z.transpose(0, 1).flatten(-2) @ layers[1].Wo + layers[1].bo, atol=1e-12)
    with pytest.raises(ValueError):
        C.bert_layers_from_state_dict({"foo": torch.zeros(1)}, heads=4)
    with pytest.raises(TypeError):
        C.bert_layers_from_state_dict([1], heads=4)
    with pytest.raises(ValueError):
        C.block_forward(X, layers[0], "transformer")
    with pytest.raises(ValueError):
        C.block_forward(randn(gen, 5, 23), layers[0])
    with pytest.raises(TypeError):
        C.block_forward(X, "layer")
    with pytest.raises(TypeError):
        C.bert_layers_from_hf(object())


def test_random_layer_shapes_and_pure_san_collapses(gen):
    layer = C.random_bert_layer(48, 4, std=1 / math.sqrt(48), generator=gen)
    assert layer.Wo.shape == (48, 48) and layer.W1.shape == (48, 192)
    X = randn(gen, 16, 48)
    san = C.stack_forward(X, [layer] * 6, "san")
    skip = C.stack_forward(X, [layer] * 6, "san+skip")
    assert C.residual_ratio(san[-1]).item() < 1e-3 * C.residual_ratio(skip[-1]).item()
    with pytest.raises(ValueError):
        C.random_bert_layer(10, 3)
    with pytest.raises(ValueError):
        C.random_bert_layer(12, 3, std=0.0)
    with pytest.raises(ValueError):
        layer.with_(Wo=torch.zeros(3, 3))


# --------------------------------------------------------------------------- entropy


def test_attention_entropy_closed_forms_and_bad_input():
    n = 8
    U = torch.full((3, n), 1 / n, dtype=torch.float64)
    assert torch.allclose(C.attention_entropy(U), torch.full((3,), math.log(n), dtype=torch.float64))
    assert torch.allclose(C.attention_entropy(torch.eye(n, dtype=torch.float64)), torch.zeros(n, dtype=torch.float64))
    p = torch.softmax(torch.randn(5, n, dtype=torch.float64), -1)
    assert torch.allclose(C.attention_entropy(p), -(p * p.log()).sum(-1))
    with pytest.raises(ValueError):
        C.attention_entropy(torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError):
        C.attention_entropy(torch.tensor([[1.5, -0.5]], dtype=torch.float64))


# --------------------------------------------------------------------------- head channel


def test_head_kernel_dim_against_brute_force(gen):
    n, H, dk, d = 5, 4, 3, 12
    shared = randn(gen, dk, d).repeat(H, 1)  # all W_O^h equal: rank d_k
    generic = randn(gen, H * dk, d)
    for Wo, expected in ((shared, n * (H - 1) * dk), (generic, 0)):
        M = C.head_summation_matrix(Wo, H, n)
        # independent oracle: apply Phi to every basis signal (Z_1..Z_H) and stack the outputs
        cols = []
        for j in range(n * H * dk):
            Z = torch.zeros(n * H * dk, dtype=torch.float64)
            Z[j] = 1.0
            cols.append((Z.reshape(n, H * dk) @ Wo).reshape(-1))
        explicit = torch.stack(cols, dim=1)
        assert torch.allclose(M, explicit)
        brute = explicit.shape[1] - np.linalg.matrix_rank(explicit.numpy())
        assert C.head_kernel_dim(Wo, H, n) == brute == expected
    assert C.head_kernel_dim(shared, H, n) == 45
    # gauge: changes every head but not the sum
    Z = randn(gen, H, n, dk)
    Delta = C.head_gauge(shared, H, n, gen)
    out = lambda Z: Z.transpose(0, 1).flatten(-2) @ shared  # noqa: E731
    assert torch.allclose(out(Z + Delta), out(Z), atol=1e-12)
    assert Delta.abs().amin(dim=(1, 2)).max() >= 0 and (Delta.flatten(1).norm(dim=1) > 1e-3).all()
    assert C.head_gauge(generic, H, n, gen).abs().max() == 0  # nothing to hide in the generic case
    with pytest.raises(ValueError):
        C.head_kernel_dim(randn(gen, 10, 4), 3, 2)
    with pytest.raises(ValueError):
        C.head_summation_matrix(shared, H, 0)


# --------------------------------------------------------------------------- PG-OP


def test_pgop_overhead_by_counting_and_identity_at_init(gen):
    m = C.PositionGatedOutputProjection(768, 12)
    assert m.overhead() == C.pgop_overhead(768, 12) == 9228 / 590592 == 1 / 64
    assert C.PositionGatedOutputProjection(768, 12, bias=False).overhead() == C.pgop_overhead(768, 12, bias=False) == 0.015625
    small = C.PositionGatedOutputProjection(24, 4, dtype=torch.float64)
    z, u = randn(gen, 2, 5, 24), randn(gen, 2, 5, 24)
    assert torch.allclose(small(z, u), small.out_proj(z), atol=1e-14)
    with torch.no_grad():
        small.gate.weight.normal_(generator=gen)
    assert not torch.allclose(small(z, u), small.out_proj(z), atol=1e-3)  # gates now matter
    with pytest.raises(ValueError):
        small(z[..., :20], u)
    with pytest.raises(ValueError):
        C.PositionGatedOutputProjection(10, 3)
    with pytest.raises(ValueError):
        C.pgop_overhead(0, 1)


# --------------------------------------------------------------------------- reachable span (B.5)


def _biased(layer, gen):
    d = layer.d
    return layer.with_(
        bq=randn(gen, d), bk=randn(gen, d), bv=randn(gen, d), bo=randn(gen, d), ln1_gamma=randn(gen, d), ln1_beta=randn(gen, d),
        b1=randn(gen, layer.W1.shape[1]), b2=randn(gen, d),
    )


@pytest.mark.parametrize("arch", ["san", "san+skip", "san+ln", "san+skip+ln"])
def test_attention_outputs_stay_in_the_reachable_span_and_mlp_leaves_it(gen, arch):
    d, H = 24, 2
    layers = [_biased(C.random_bert_layer(d, H, std=0.3, generator=gen), gen) for _ in range(2)]
    S0 = randn(gen, d, 1)
    K = C.reachable_span(S0, layers, arch)
    skip, _, ln = C.ARCHITECTURES[arch]
    bound = 1
    for _ in layers:  # (#maps) * dim + attention bias (+ LN beta)
        bound = (H + skip) * bound + 1 + ln
    assert K.shape[1] <= min(d, bound)
    Pk = K @ K.T
    outs = []
    for _ in range(5):
        X = randn(gen, 7, 1) @ S0.T  # rows in S0
        Y = C.stack_forward(X, layers, arch)[-1]
        assert (Y - Y @ Pk).abs().max() < 1e-9 * max(1.0, Y.abs().max().item())
        with_mlp = {"san": "san+mlp", "san+skip": "san+skip+mlp", "san+ln": "san+mlp+ln", "san+skip+ln": "full"}[arch]
        outs.append(C.stack_forward(X, layers, with_mlp)[-1])
    # negative control: with the MLP, outputs leave K (when K is not everything)
    if K.shape[1] < d:
        Y = torch.cat(outs)
        assert (Y - Y @ Pk).abs().max() > 1e-3


def test_reachable_span_bad_input(gen):
    layer = C.random_bert_layer(12, 2, generator=gen)
    with pytest.raises(ValueError):
        C.reachable_span(randn(gen, 12, 1), [layer], "full")
    with pytest.raises(ValueError):
        C.reachable_span(randn(gen, 10, 1), [layer])
    with pytest.raises(ValueError):
        C.reachable_span(randn(gen, 12, 1), [])


def test_stack_forward_and_entropy_bad_input(gen):
    with pytest.raises(ValueError):
        C.stack_forward(randn(gen, 4, 12), [])
    with pytest.raises(TypeError):
        C.residual_ratio([[1.0]])
    with pytest.raises(ValueError):
        C.centering(0)
    # batched entropy and ratios keep their batch shape
    P = torch.softmax(randn(gen, 2, 3, 5, 5), -1)
    assert C.attention_entropy(P).shape == (2, 3, 5)
    assert C.residual_ratio(randn(gen, 2, 3, 5, 4)).shape == (2, 3)
