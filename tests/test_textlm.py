"""flagcore.textlm: the offline corpus, the character-level causal Transformer and its query-weight layout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flagcore.heads import head_overlap
from flagcore.textlm import (
    CharCorpus,
    CharTransformer,
    LMConfig,
    char_corpus,
    corpus_text,
    query_head_weights,
    sample_batch,
    train_lm,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus() -> CharCorpus:
    return char_corpus(corpus_text("pydoc"))


def _model(vocab=11, d=12, L=2, H=3, dk=4, seq=9, seed=0):
    return CharTransformer(LMConfig(vocab, d, L, H, dk, seq), torch.Generator().manual_seed(seed))


def test_corpus_is_real_text_and_round_trips(corpus):
    text = corpus_text()
    assert len(text) > 300_000 and "statement" in text and text == corpus_text()  # deterministic
    assert corpus.vocab_size == len(set(text)) and corpus.chars == "".join(sorted(set(text)))
    assert corpus.train.numel() + corpus.valid.numel() == len(text)
    assert abs(corpus.valid.numel() / len(text) - 0.1) < 1e-3
    assert corpus.decode(corpus.train[:500]) == text[:500]  # the training split is the start of the text
    assert corpus.decode(corpus.valid[-50:]) == text[-50:]
    torch.testing.assert_close(corpus.encode(text[:200]), corpus.train[:200])


def test_pinned_corpus_is_python_3_11_7_topics(monkeypatch):
    """The shipped text is the standard library's pydoc topics of CPython 3.11.7 (oracle: the running
    interpreter's own copy, when it is that version), and a damaged file is refused (negative control)."""
    import sys

    from flagcore import corpus as pinned

    topics = pinned.pydoc_topics()
    assert pinned.PYDOC_TOPICS_VERSION == "3.11.7" and len(topics) == 79
    assert len(corpus_text()) == 465_126
    if sys.version_info[:3] == (3, 11, 7):
        from pydoc_data.topics import topics as stdlib

        assert topics == dict(stdlib)
    topics["if"] = "changed"  # a fresh dict each call: the cache cannot be altered from outside
    assert pinned.pydoc_topics()["if"] != "changed"
    pinned._topics.cache_clear()
    monkeypatch.setattr(pinned, "PYDOC_TOPICS_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="damaged"):
        pinned.pydoc_topics()
    pinned._topics.cache_clear()


def test_prose_keeps_the_running_text_only():
    """prose(topic): every kept paragraph is unindented text of the topic with >= min_words words; the
    indented grammar and code lines are gone (oracle: the raw topic, split by hand)."""
    from flagcore.corpus import PROSE_TOPICS, prose, pydoc_topics

    raw, checked = pydoc_topics(), 0
    for topic in PROSE_TOPICS:
        text = prose(topic)
        assert len(text.split()) >= 50 and "\n" not in text
        # paragraphs with an indented line (grammar rules, code samples), joined the way prose joins lines
        indented = [" ".join(line.strip() for line in p.split("\n")) for p in raw[topic].split("\n\n")
                    if any(line.startswith(" ") for line in p.split("\n")) and len(p.split()) >= 4]
        assert not any(p in text for p in indented)  # none of them is kept
        checked += len(indented)
    assert checked > 20  # the topics do hold such lines, so the check above had something to reject
    assert len(prose("exceptions", min_words=1)) > len(prose("exceptions")) > len(prose("exceptions", min_words=60))
    with pytest.raises(ValueError, match="unknown topic"):
        prose("no-such-topic")


def test_batches_are_shifted_windows_of_the_text(corpus):
    g = torch.Generator().manual_seed(0)
    x, y = sample_batch(corpus.train, 5, 17, g)
    assert x.shape == y.shape == (5, 17) and x.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    text = corpus.decode(corpus.train)
    for row_x, row_y in zip(x, y):
        window = corpus.decode(row_x) + corpus.decode(row_y[-1:])
        assert window in text  # a contiguous piece of the real corpus
    again = sample_batch(corpus.train, 5, 17, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x)  # seeded


def test_planted_query_weights_in_canonical_layout():
    """query_head_weights(model)[l, h] must be attn.q.weight[h*d_k:(h+1)*d_k].T (the nn.Linear rule of spec A.16),
    and the model's own queries must equal x @ W[l, h]."""
    model = _model(d=12, L=2, H=3, dk=4)
    planted = [torch.arange(12 * 12, dtype=torch.float32).reshape(12, 12) / 100 + layer for layer in range(2)]
    with torch.no_grad():
        for block, B in zip(model.blocks, planted):
            block.attn.q.weight.copy_(B)
    W = query_head_weights(model)
    assert W.shape == (2, 3, 12, 4)
    for layer in range(2):
        for h in range(3):
            assert torch.equal(W[layer, h], planted[layer][h * 4 : (h + 1) * 4].T)
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q = model.blocks[1].attn.queries(x)
    torch.testing.assert_close(q, torch.einsum("btd,hdk->bhtk", x, W[1]), rtol=1e-6, atol=1e-6)
    # negative control: the Conv1D column rule is wrong for this layout
    wrong = planted[1].reshape(12, 3, 4).transpose(0, 1)
    assert not torch.allclose(q, torch.einsum("btd,hdk->bhtk", x, wrong), atol=1e-2)
    # a detached copy: editing it leaves the model alone
    W[0, 0].zero_()
    assert torch.equal(model.blocks[0].attn.q.weight, planted[0])


def test_non_square_heads_layout():
    """H d_k != d: W is [L, H, d, d_k] all the same."""
    model = _model(d=10, H=2, dk=3)
    W = query_head_weights(model)
    assert W.shape == (2, 2, 10, 3)
    torch.testing.assert_close(W[1, 1], model.blocks[1].attn.q.weight[3:6].T)


def test_causal_mask():
    """The output at position i does not depend on tokens after i (and does depend on tokens before)."""
    model = _model(vocab=11, seq=9).eval()
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 11, (3, 9), generator=g)
    with torch.no_grad():
        base = model(idx)
        for i in range(8):
            changed = idx.clone()
            changed[:, i + 1 :] = (changed[:, i + 1 :] + 1 + torch.randint(0, 10, changed[:, i + 1 :].shape, generator=g)) % 11
            out = model(changed)
            torch.testing.assert_close(out[:, : i + 1], base[:, : i + 1], rtol=0, atol=1e-6)
            assert (out[:, i + 1 :] - base[:, i + 1 :]).abs().max() > 1e-4  # negative control: later positions do change
        earlier = idx.clone()
        earlier[:, 0] = (earlier[:, 0] + 1) % 11
        assert (model(earlier)[:, -1] - base[:, -1]).abs().max() > 1e-5


def test_initialisation_is_seeded_and_haar_like():
    a, b, c = _model(seed=3), _model(seed=3), _model(seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.blocks[0].attn.q.weight, c.blocks[0].attn.q.weight)
    std = LMConfig(11).init_std
    big = CharTransformer(LMConfig(vocab=11, d=64, n_layers=8, n_heads=4, d_k=16, max_seq=4), torch.Generator().manual_seed(0))
    W = query_head_weights(big)
    assert abs(W.std().item() - std) < 0.05 * std
    R = head_overlap(W.double())  # i.i.d. Gaussian heads: R ~ d_k/d = 0.25, sd 0.0067
    assert (R - 0.25).abs().max() < 4 * 0.0067


def test_training_learns_and_records(corpus):
    cfg = LMConfig(corpus.vocab_size, d=32, n_layers=1, n_heads=2, d_k=16, max_seq=16)
    model = CharTransformer(cfg, torch.Generator().manual_seed(0))
    rec = train_lm(model, corpus, steps=60, batch=8, lr=3e-3, weight_decay=0.1, every=20, warmup=5, generator=torch.Generator().manual_seed(0))
    assert rec.steps == [0, 20, 40, 60] and len(rec.loss) == 60 and len(rec.R) == len(rec.q_norm) == len(rec.valid_loss) == 4
    assert rec.loss[0] > 0.9 * math.log(corpus.vocab_size)  # starts near uniform
    assert sum(rec.loss[-10:]) / 10 < 0.8 * math.log(corpus.vocab_size) and rec.valid_loss[-1] < rec.valid_loss[0]
    R = rec.R_tensor()
    assert R.shape == (4, 1) and R.dtype == torch.float64
    assert abs(R[-1, 0].item() - head_overlap(query_head_weights(model).double())[0].item()) < 1e-12
    # deterministic: the same seeds give the same run
    again = train_lm(CharTransformer(cfg, torch.Generator().manual_seed(0)), corpus, steps=60, batch=8, lr=3e-3,
                     weight_decay=0.1, every=20, warmup=5, generator=torch.Generator().manual_seed(0))
    assert again.loss == rec.loss and again.R == rec.R


def test_weight_decay_acts_on_matrices_only(corpus):
    """With huge decay and tiny steps, weight matrices shrink by (1 - lr wd) per step while
    LayerNorm gains (1-d) keep their value (decay is applied to 2-d weights only)."""
    cfg = LMConfig(corpus.vocab_size, d=16, n_layers=1, n_heads=2, d_k=8, max_seq=8)
    model = CharTransformer(cfg, torch.Generator().manual_seed(0))
    q0 = model.blocks[0].attn.q.weight.detach().clone()
    train_lm(model, corpus, steps=20, batch=2, lr=1e-6, weight_decay=1e4, every=10, warmup=0, generator=torch.Generator().manual_seed(0))
    shrink = (model.blocks[0].attn.q.weight.norm() / q0.norm()).item()
    assert abs(shrink - (1 - 1e-6 * 1e4) ** 20) < 1e-3  # AdamW: W <- W (1 - lr wd) per step (+ a step of size ~lr)
    assert torch.allclose(model.blocks[0].ln1.weight, torch.ones(16), atol=1e-4)


def test_bad_input(corpus):
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus_text("shakespeare")
    with pytest.raises(TypeError):
        char_corpus(b"bytes")
    with pytest.raises(ValueError, match="valid_fraction"):
        char_corpus("abc", valid_fraction=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        char_corpus("a")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        char_corpus("abc").encode("abd")
    with pytest.raises(TypeError):
        sample_batch(torch.arange(10.0), 2, 3)
    with pytest.raises(ValueError, match="seq \\+ 1"):
        sample_batch(torch.arange(5), 2, 5)
    with pytest.raises(ValueError, match=">= 1"):
        sample_batch(torch.arange(50), 0, 5)
    with pytest.raises(ValueError, match="n_heads"):
        LMConfig(vocab=5, n_heads=0)
    with pytest.raises(TypeError):
        LMConfig(vocab=5.0)
    with pytest.raises(ValueError, match="init_std"):
        LMConfig(vocab=5, init_std=float("nan"))
    with pytest.raises(TypeError):
        CharTransformer({"vocab": 5})
    model = _model(vocab=11, seq=9)
    with pytest.raises(ValueError, match="max_seq"):
        model(torch.zeros(1, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 3), 11, dtype=torch.int64))
    with pytest.raises(TypeError):
        model(torch.zeros(1, 3))
    with pytest.raises(TypeError):
        query_head_weights(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="vocabulary"):
        train_lm(model, corpus, steps=1)
    good = CharTransformer(LMConfig(corpus.vocab_size, d=8, n_layers=1, n_heads=2, d_k=4, max_seq=8))
    with pytest.raises(ValueError, match="lr"):
        train_lm(good, corpus, steps=1, lr=-1.0)
    with pytest.raises(ValueError, match="steps"):
        train_lm(good, corpus, steps=0)


# --------------------------------------------------------------------------- runs saved as revisions


def test_pythia_schedule_has_pythias_154_checkpoints():
    from flagcore.textlm import pythia_schedule

    pythia = pythia_schedule(143_000, 1000)
    assert len(pythia) == 154  # Pythia's published count: step0, 10 powers of two, 143 thousands
    assert pythia[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000] and pythia[-1] == 143_000
    assert pythia_schedule(250, 50) == [0, 1, 2, 4, 8, 16, 32, 50, 100, 150, 200, 250]
    assert pythia_schedule(70, 50) == [0, 1, 2, 4, 8, 16, 32, 50, 70]
    with pytest.raises(ValueError):
        pythia_schedule(0, 50)


def test_train_revisions_saves_a_reproducible_pythia_format_run(tmp_path):
    """Revisions in Pythia's format (GPT-NeoX config, model.safetensors), main a byte-identical copy of
    the last step, the same bytes for the same seed whatever the thread count, other bytes for another
    seed; and the saved step-0 model is the initialisation (its loss is the untrained one)."""
    from safetensors.torch import load_file

    from flagcore.textlm import train_revisions

    corpus = char_corpus(corpus_text()[:20_000])
    kw = dict(save_at=[0, 2, 3], d=32, n_layers=1, n_heads=2, seq=16, batch=4)
    losses = train_revisions(tmp_path / "a", corpus, seed=0, **kw)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_revisions(tmp_path / "b", corpus, seed=0, **kw)
    finally:
        torch.set_num_threads(before)
    train_revisions(tmp_path / "c", corpus, seed=1, **kw)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["main", "step0", "step2", "step3"]
    config = json.loads((tmp_path / "a" / "step3" / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["num_attention_heads"] == 2
    read = lambda run, rev: (tmp_path / run / rev / "model.safetensors").read_bytes()  # noqa: E731
    assert read("a", "main") == read("a", "step3") != read("a", "step2")
    assert read("a", "step3") == read("b", "step3")  # thread count does not matter
    assert read("a", "step0") != read("c", "step0")
    init = load_file(tmp_path / "a" / "step0" / "model.safetensors")
    assert abs(float(init["gpt_neox.layers.0.attention.query_key_value.weight"].std()) - 0.02) < 0.003
    with pytest.raises(ValueError, match="not empty"):
        train_revisions(tmp_path / "a", corpus, seed=0, **kw)
