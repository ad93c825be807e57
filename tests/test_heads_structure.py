"""flagcore.heads, beyond R: top pairs, pair angles and their Haar law, hierarchical clustering of heads
(against scipy.cluster.hierarchy), and synthetic ensembles with the same R but different structure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from flagcore import frobenius_overlap, haar_frames, intersection_dim
from flagcore.heads import (
    cut_linkage,
    haar_angle_samples,
    head_overlap,
    leaf_order,
    linkage,
    overlap_matrix,
    pair_angles,
    planted_copies,
    shared_core_heads,
    top_pairs,
)


def _random_distances(n, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    return np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))


def _same_partition(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


# --------------------------------------------------------------------------- clustering vs scipy


@pytest.mark.parametrize("method", ["single", "complete", "average"])
@given(n=st.integers(2, 14), seed=st.integers(0, 10**6))
def test_linkage_matches_scipy(method, n, seed):
    D = _random_distances(n, seed)
    Z = linkage(torch.from_numpy(D), method).numpy()
    Zs = hierarchy.linkage(squareform(D, checks=False), method)
    np.testing.assert_allclose(Z[:, 2], Zs[:, 2], rtol=0, atol=1e-12)  # merge heights
    np.testing.assert_allclose(  # the whole tree, through its cophenetic distances
        squareform(hierarchy.cophenet(Z)), squareform(hierarchy.cophenet(Zs)), rtol=0, atol=1e-12
    )
    np.testing.assert_array_equal(Z[:, 3], Zs[:, 3])
    assert (np.diff(Z[:, 2]) >= -1e-15).all()


@given(n=st.integers(2, 14), seed=st.integers(0, 10**6), q=st.floats(0.0, 1.0))
def test_cut_and_leaf_order_match_scipy(n, seed, q):
    D = _random_distances(n, seed)
    Zs = hierarchy.linkage(squareform(D, checks=False), "average")
    Z = torch.from_numpy(Zs)
    t = float(np.quantile(Zs[:, 2], q))
    labels = cut_linkage(Z, t).numpy()
    assert _same_partition(labels, hierarchy.fcluster(Zs, t, criterion="distance"))
    assert labels[0] == 0 and set(labels) == set(range(labels.max() + 1))
    np.testing.assert_array_equal(leaf_order(Z).numpy(), hierarchy.leaves_list(Zs))


def test_cut_extremes_and_negative_control():
    D = _random_distances(8, 1)
    Z = linkage(torch.from_numpy(D))
    assert cut_linkage(Z, -1.0).tolist() == list(range(8))  # nothing merged
    assert cut_linkage(Z, math.inf).tolist() == [0] * 8  # everything merged
    # negative control: single linkage differs from complete linkage on a chain (the oracle can tell them apart)
    chain = np.abs(np.subtract.outer(np.arange(5.0), np.arange(5.0))) ** 1.01
    Zsingle, Zcomplete = linkage(torch.from_numpy(chain), "single"), linkage(torch.from_numpy(chain), "complete")
    assert not torch.allclose(Zsingle[:, 2], Zcomplete[:, 2])


def test_clustering_bad_input():
    D = torch.from_numpy(_random_distances(4, 0))
    with pytest.raises(ValueError, match="method"):
        linkage(D, "ward")
    with pytest.raises(ValueError, match="symmetric"):
        linkage(D + torch.triu(torch.ones(4, 4), 1))
    with pytest.raises(ValueError, match="zero diagonal"):
        linkage(D + torch.eye(4))
    with pytest.raises(ValueError, match="square"):
        linkage(D[:3])
    with pytest.raises(ValueError, match="NaN"):
        linkage(D * float("nan"))
    with pytest.raises(TypeError):
        linkage(D.numpy())
    with pytest.raises(ValueError, match="linkage matrix"):
        cut_linkage(torch.zeros(3, 3), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        cut_linkage(linkage(D), float("nan"))
    with pytest.raises(ValueError, match="only ids"):
        cut_linkage(torch.tensor([[0.0, 9.0, 0.1, 2.0], [1.0, 2.0, 0.2, 3.0]]), 1.0)


# --------------------------------------------------------------------------- pairs and angles


def test_top_pairs_and_pair_angles_against_brute_force(gen):
    W = haar_frames(20, 4, 6, gen) @ torch.randn(6, 4, 4, generator=gen, dtype=torch.float64)
    O = overlap_matrix(W)
    pairs = top_pairs(O, 15)
    brute = sorted(((float(frobenius_overlap(W[i], W[j])) / 4, i, j) for i in range(6) for j in range(i + 1, 6)), reverse=True)
    assert [tuple(p) for p in pairs.tolist()] == [(i, j) for _, i, j in brute]
    theta = pair_angles(W, pairs)
    assert theta.shape == (15, 4) and bool((theta.diff(dim=-1) >= -1e-12).all())
    # O_ij = sum cos^2(theta) / r (spec A.14)
    np.testing.assert_allclose(theta.cos().square().sum(-1) / 4, [b[0] for b in brute], atol=1e-12)


def test_pair_bad_input(gen):
    W = haar_frames(10, 2, 3, gen)
    O = overlap_matrix(W)
    with pytest.raises(ValueError, match="n must be"):
        top_pairs(O, 4)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pair_angles(W, torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match=r"\[P, 2\]"):
        pair_angles(W, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        pair_angles(W, torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        pair_angles(W.unsqueeze(0), torch.tensor([[0, 1]]))


@pytest.mark.parametrize("d,k", [(8, 2), (30, 5), (64, 8)])
def test_haar_angles_mean_overlap(d, k, gen):
    """E sum cos^2 = k^2/d exactly (spec A.14); within 5 standard errors over 2000 pairs."""
    theta = haar_angle_samples(d, k, 2000, gen)
    s = theta.cos().square().sum(-1)
    assert theta.shape == (2000, k)
    assert abs(s.mean().item() - k * k / d) < 5 * s.std().item() / math.sqrt(2000)
    with pytest.raises(ValueError, match="n must"):
        haar_angle_samples(d, k, 0, gen)


def test_haar_angles_in_chunks_keep_the_law(gen, monkeypatch):
    """Drawn in many small chunks (as 5000 pairs at d = 2048 are), the angles keep their shape, their
    independence and the exact mean overlap k^2/d."""
    import flagcore.heads as heads_module

    monkeypatch.setattr(heads_module, "_SAMPLE_CHUNK_BYTES", 2 * 30 * 5 * 8 * 7)  # 7 pairs per chunk
    theta = haar_angle_samples(30, 5, 2000, gen)
    s = theta.cos().square().sum(-1)
    assert theta.shape == (2000, 5) and len(set(s.tolist())) == 2000
    assert abs(s.mean().item() - 25 / 30) < 5 * s.std().item() / math.sqrt(2000)


# --------------------------------------------------------------------------- synthetic constructions


def test_planted_copies_structure(gen):
    H, d, k, c = 10, 60, 6, 4
    W = planted_copies(H, d, k, c, gen)
    O = overlap_matrix(W)
    assert torch.allclose(O[:c, :c], torch.ones(c, c, dtype=O.dtype), atol=1e-10)
    assert not torch.allclose(W[0], W[1])  # different bases of the same plane
    assert int(intersection_dim(W[0], W[1])) == k and int(intersection_dim(W[0], W[c])) == 0
    # expected R (closed form in the docstring): mean over 200 draws within 5 standard errors
    Rs = torch.stack([head_overlap(planted_copies(H, d, k, c, gen)) for _ in range(200)])
    expect = (c * (c - 1) + (H * (H - 1) - c * (c - 1)) * k / d) / (H * (H - 1))
    assert abs(Rs.mean().item() - expect) < 5 * Rs.std().item() / math.sqrt(200)
    with pytest.raises(ValueError, match="copies"):
        planted_copies(H, d, k, 1, gen)


@given(R=st.floats(0.15, 0.9), seed=st.integers(0, 10**6))
def test_shared_core_hits_R_without_copies(R, seed):
    g = torch.Generator().manual_seed(seed)
    W = shared_core_heads(8, 40, 4, R, g)
    assert abs(head_overlap(W).item() - R) < 1e-10
    O = overlap_matrix(W)
    off = O[~torch.eye(8, dtype=torch.bool)]
    assert off.max().item() < 1 - 1e-6  # no two heads coincide


def test_same_R_different_structure_and_negative_control(gen):
    H, d, k = 12, 96, 8
    A = planted_copies(H, d, k, 4, gen)
    R = head_overlap(A).item()
    B = shared_core_heads(H, d, k, R, gen)
    assert abs(head_overlap(B).item() - R) < 1e-10  # R cannot tell them apart ...
    OA, OB = overlap_matrix(A), overlap_matrix(B)
    # ... the clustering can: a cluster of 4 at distance 0 vs all singletons at cut 0.1
    sizes = lambda O: np.bincount(cut_linkage(linkage(1 - O), 0.1).numpy())  # noqa: E731
    assert sorted(sizes(OA)) == [1] * 8 + [4] and sorted(sizes(OB)) == [1] * H
    # ... and so does the spectrum of O (3 zero eigenvalues from 4 equal rows)
    assert (torch.linalg.eigvalsh(OA) < 1e-8).sum() == 3 and (torch.linalg.eigvalsh(OB) < 1e-3).sum() == 0
    # negative control: two independent ensembles of the same kind are not separated
    A2 = planted_copies(H, d, k, 4, gen)
    assert sorted(sizes(overlap_matrix(A2))) == sorted(sizes(OA))


def test_shared_core_bad_R(gen):
    with pytest.raises(ValueError, match="R must lie"):
        shared_core_heads(6, 20, 2, 0.01, gen)
    with pytest.raises(ValueError, match="R must lie"):
        shared_core_heads(6, 20, 2, 1.0, gen)
