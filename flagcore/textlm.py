"""A small causal character-level Transformer trained from scratch on real text that ships offline.

Purpose: the dynamic form of Conjecture 6.2 of the flag paper, which the paper leaves open
for lack of training checkpoints: does the head-overlap score ``R`` of the query heads rise during
training, and faster with weight decay? This module provides the pieces, all pure (no printing):

* the corpus: :func:`corpus_text` returns the English reference text of CPython's own documentation
  topics, as of Python 3.11.7 (:func:`flagcore.corpus.pydoc_topics`: shipped with flagcore, so the
  text is the same offline, in Colab and on any Python version);
  :func:`char_corpus` tokenises it at the character level (vocabulary = the characters that occur);
  :func:`sample_batch` draws random windows for next-character prediction.
* the model: :class:`CharTransformer`, a pre-LayerNorm GPT-style decoder (learned positions, causal
  softmax attention, GELU MLP, untied read-out). Each attention layer keeps separate ``nn.Linear``
  query/key/value projections of shape ``[H*d_k, d]`` (``y = x W^T``), the layout of BERT/Llama in
  :mod:`flagcore.weights`.
* :func:`query_head_weights`: the canonical ``[L, H, d, d_k]`` query weights (``q_h = x @ W[l, h]``, the
  TransformerLens convention of :mod:`flagcore.weights`; raw weights, LayerNorm not folded in), ready for
  :func:`flagcore.heads.head_overlap`.
* :func:`train_lm`: AdamW with decoupled weight decay on the weight matrices (not on LayerNorm gains or
  biases), recording the training loss at every step and, every ``every`` steps, ``R`` per layer, the
  query weights' Frobenius norm and a held-out loss.
* :func:`train_revisions`: the same recipe on Pythia's architecture (transformers' GPT-NeoX), saving the
  model at each step of a Pythia-like schedule (:func:`pythia_schedule`) as a revision of a run directory
  in the format Pythia publishes (``config.json`` + ``model.safetensors``), for the tools that read
  training runs (:func:`flagcore.heads.revision_profile`).

Determinism: the initialisation and the batches come from explicit ``torch.Generator`` objects, and on
the CPU :func:`train_lm` runs on one thread (:func:`flagcore.reproducible.one_cpu_thread`), so a seed fixes a
run on a given kind of device, whatever the core count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .corpus import pydoc_topics
from .heads import head_overlap
from .reproducible import on_one_cpu_thread
from .subspace import _as_int
from .weights import rows_to_heads

__all__ = [
    "CORPORA",
    "CharCorpus",
    "CharTransformer",
    "LMConfig",
    "TrainRecord",
    "char_corpus",
    "corpus_text",
    "pythia_schedule",
    "query_head_weights",
    "sample_batch",
    "train_lm",
    "train_revisions",
]

#: Corpora available offline: name -> description.
CORPORA = {
    "pydoc": "CPython 3.11.7's documentation topics (pydoc_data.topics: the language reference text behind "
    "help('topic'), shipped with flagcore), 465,126 characters of English technical prose with code samples",
}


# --------------------------------------------------------------------------- corpus


def corpus_text(name: str = "pydoc") -> str:
    """The raw text of an offline corpus (:data:`CORPORA`). ``pydoc``: the topics of
    :func:`flagcore.corpus.pydoc_topics` concatenated in sorted-key order (deterministic), separated by
    blank lines."""
    if name != "pydoc":
        raise ValueError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}")
    topics = pydoc_topics()
    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class CharCorpus:
    """A character-level tokenisation: ``chars[i]`` is token ``i``; ``train``/``valid`` are int64 token ids
    (the first ``1 - valid_fraction`` of the text and the rest, so held-out text is unseen text)."""

    chars: str
    train: Tensor
    valid: Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        missing = sorted(set(text) - set(index))
        if missing:
            raise ValueError(f"characters outside the vocabulary: {missing[:10]!r}")
        return torch.tensor([index[c] for c in text], dtype=torch.int64)

    def decode(self, tokens: Tensor | Iterable[int]) -> str:
        ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        if any(not 0 <= i < len(self.chars) for i in ids):
            raise ValueError(f"token ids must lie in [0, {len(self.chars)})")
        return "".join(self.chars[i] for i in ids)


def char_corpus(text: str, valid_fraction: float = 0.1) -> CharCorpus:
    """Tokenise ``text`` at the character level; the vocabulary is its sorted set of characters."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    valid_fraction = float(valid_fraction)
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must lie in [0, 1), got {valid_fraction}")
    if len(text) < 2:
        raise ValueError("the corpus needs at least 2 characters")
    chars = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    cut = len(text) - int(round(valid_fraction * len(text)))
    return CharCorpus(chars, ids[:cut], ids[cut:])


def sample_batch(tokens: Tensor, batch: int, seq: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``batch`` random windows of ``seq`` tokens and their next-token targets: ``x, y`` ``[batch, seq]``
    with ``y[:, t] = tokens[start + t + 1]``. Start positions are uniform (``generator`` on the CPU)."""
    if not isinstance(tokens, Tensor) or tokens.ndim != 1 or tokens.dtype != torch.int64:
        raise TypeError("tokens must be a 1-d int64 torch.Tensor")
    batch, seq = _as_int("batch", batch), _as_int("seq", seq)
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be >= 1, got batch={batch}, seq={seq}")
    if tokens.numel() < seq + 1:
        raise ValueError(f"need at least seq + 1 = {seq + 1} tokens, got {tokens.numel()}")
    start = torch.randint(0, tokens.numel() - seq, (batch,), generator=generator)
    offsets = torch.arange(seq + 1)
    windows = tokens[(start[:, None] + offsets[None, :]).to(tokens.device)]
    return windows[:, :-1], windows[:, 1:]


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class LMConfig:
    """Shape of a :class:`CharTransformer`: ``vocab`` tokens, residual width ``d``, ``n_layers`` blocks of
    ``n_heads`` heads of width ``d_k`` (``H d_k`` need not equal ``d``), context ``max_seq``, MLP width
    ``mlp_ratio * d``; weights initialised N(0, ``init_std``^2) (GPT-2's 0.02), the residual output
    projections scaled by ``1/sqrt(2 n_layers)``."""

    vocab: int
    d: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_k: int = 16
    max_seq: int = 64
    mlp_ratio: int = 4
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab", "d", "n_layers", "n_heads", "d_k", "max_seq", "mlp_ratio"):
            value = _as_int(name, getattr(self, name))
            if value < 1:
                raise ValueError(f"LMConfig.{name} must be >= 1, got {value}")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"LMConfig.init_std must be a positive finite number, got {self.init_std}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal softmax attention with separate ``nn.Linear`` q/k/v (``[H*d_k, d]``) and o (``[d, H*d_k]``)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.d_k = cfg.n_heads, cfg.d_k
        width = cfg.n_heads * cfg.d_k
        self.q = nn.Linear(cfg.d, width, bias=False)
        self.k = nn.Linear(cfg.d, width, bias=False)
        self.v = nn.Linear(cfg.d, width, bias=False)
        self.o = nn.Linear(width, cfg.d, bias=False)

    def _split(self, y: Tensor) -> Tensor:
        B, T, _ = y.shape
        return y.view(B, T, self.n_heads, self.d_k).transpose(1, 2)  # [B, H, T, d_k]

    def queries(self, x: Tensor) -> Tensor:
        """``[B, H, T, d_k]``: head ``h``'s queries, ``x @ W_Q[h]`` with ``W_Q`` from :func:`query_head_weights`."""
        return self._split(self.q(x))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.queries(x), self._split(self.k(x)), self._split(self.v(x))
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q k^T / sqrt(d_k)) v, causal
        B, H, T, dk = z.shape
        return self.o(z.transpose(1, 2).reshape(B, T, H * dk))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d)
        self.mlp = nn.Sequential(nn.Linear(cfg.d, cfg.mlp_ratio * cfg.d), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_ratio * cfg.d, cfg.d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A GPT-style causal language model (pre-LayerNorm blocks, learned positions, untied read-out).

    ``forward(idx)`` maps token ids ``[B, T]`` (``T <= max_seq``) to next-token logits ``[B, T, vocab]``;
    the output at position ``t`` depends on ``idx[:, :t+1]`` only (causal mask). ``generator`` seeds the
    initialisation (default: torch's global generator).
    """

    def __init__(self, cfg: LMConfig, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(cfg, LMConfig):
            raise TypeError(f"cfg must be an LMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d)
        self.pos = nn.Embedding(cfg.max_seq, cfg.d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d)
        self.head = nn.Linear(cfg.d, cfg.vocab, bias=False)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.ndim == 2:
                scale = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("attn.o.weight", "mlp.2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
            elif name.endswith("bias"):
                p.zero_()
            else:  # LayerNorm gains
                p.fill_(1.0)

    def forward(self, idx: Tensor) -> Tensor:
        if not isinstance(idx, Tensor) or idx.dtype not in (torch.int64, torch.int32) or idx.ndim != 2:
            raise TypeError("idx must be an integer tensor of shape [batch, seq]")
        B, T = idx.shape
        if not 1 <= T <= self.cfg.max_seq:
            raise ValueError(f"sequence length must lie in [1, max_seq={self.cfg.max_seq}], got {T}")
        if bool((idx < 0).any()) or bool((idx >= self.cfg.vocab).any()):
            raise ValueError(f"token ids must lie in [0, vocab={self.cfg.vocab})")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats)."""
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def query_head_weights(model: CharTransformer) -> Tensor:
    """The query weights of every layer and head, ``[L, H, d, d_k]`` (a detached copy): ``W[l, h]`` is the
    ``[d, d_k]`` matrix with ``q_h = x @ W[l, h]`` for ``x`` the block's LayerNormed input, i.e.
    ``attn.q.weight[h*d_k:(h+1)*d_k].T`` (the canonical layout of :mod:`flagcore.weights`)."""
    if not isinstance(model, CharTransformer):
        raise TypeError(f"model must be a CharTransformer, got {type(model).__name__}")
    return torch.stack([rows_to_heads(b.attn.q.weight.detach(), model.cfg.n_heads) for b in model.blocks]).clone()


# --------------------------------------------------------------------------- training


@dataclass
class TrainRecord:
    """What :func:`train_lm` saw. ``loss[s]``: training loss of step ``s`` (before its update); at each
    checkpoint step in ``steps`` (``0`` = initialisation, before any update): ``R[c]`` ``[L]`` (float64),
    ``q_norm[c]`` ``[L]`` (Frobenius norm of the layer's query weight) and ``valid_loss[c]``."""

    steps: list[int] = field(default_factory=list)
    R: list[list[float]] = field(default_factory=list)
    q_norm: list[list[float]] = field(default_factory=list)
    valid_loss: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)

    def R_tensor(self) -> Tensor:
        """``[checkpoints, L]`` float64."""
        return torch.tensor(self.R, dtype=torch.float64)


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _recipe_step(model: nn.Module, opt: torch.optim.Optimizer, loss: Tensor, step: int, lr: float, warmup: int) -> float:
    """One step of the training recipe shared by :func:`train_lm` and :func:`train_revisions`: linear warm-up
    of the learning rate over ``warmup`` steps, then ``lr``; a finite-loss check; gradient clipping at norm
    1; the optimiser's step. Returns the loss."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training diverged at step {step} (loss {float(loss)}); lower lr")
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


@on_one_cpu_thread
def train_lm(
    model: CharTransformer,
    corpus: CharCorpus,
    *,
    steps: int,
    batch: int = 16,
    seq: int | None = None,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    every: int = 50,
    generator: torch.Generator | None = None,
    warmup: int = 50,
    valid_batches: int = 4,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> TrainRecord:
    """Train ``model`` in place for ``steps`` AdamW steps (betas 0.9, 0.95; gradient clipping at norm 1;
    linear warm-up over ``warmup`` steps, then constant ``lr``), with decoupled weight decay
    ``weight_decay`` on every weight matrix (embeddings, projections, read-out) and none on LayerNorm
    gains and biases. Checkpoints at step 0 and every ``every`` steps (and at the end) record ``R`` per
    layer (:func:`flagcore.heads.head_overlap` in float64), the query-weight norms and the loss on
    ``valid_batches`` held-out batches (drawn from a generator of its own, seeded 0, so every run and
    checkpoint sees the same held-out windows). ``generator`` draws the training batches.
    ``progress``: optional wrapper of the step iterator (e.g. ``tqdm``). On the CPU the run uses one thread
    (:func:`flagcore.reproducible.one_cpu_thread`), so its result does not depend on the core count.
    """
    if not isinstance(model, CharTransformer):
        raise TypeError(f"model must be a CharTransformer, got {type(model).__name__}")
    if not isinstance(corpus, CharCorpus):
        raise TypeError(f"corpus must be a CharCorpus, got {type(corpus).__name__}")
    if corpus.vocab_size != model.cfg.vocab:
        raise ValueError(f"corpus has {corpus.vocab_size} characters but the model's vocabulary is {model.cfg.vocab}")
    steps, every, warmup, valid_batches = (_as_int(n, v) for n, v in (("steps", steps), ("every", every), ("warmup", warmup), ("valid_batches", valid_batches)))
    seq = model.cfg.max_seq if seq is None else _as_int("seq", seq)
    if steps < 1 or every < 1 or warmup < 0 or valid_batches < 1:
        raise ValueError(f"need steps >= 1, every >= 1, warmup >= 0, valid_batches >= 1; got {steps}, {every}, {warmup}, {valid_batches}")
    lr, weight_decay = float(lr), float(weight_decay)
    if not (math.isfinite(lr) and lr > 0) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"need lr > 0 and weight_decay >= 0 (finite), got lr={lr}, weight_decay={weight_decay}")
    device = next(model.parameters()).device
    valid_gen = torch.Generator().manual_seed(0)
    held_out = [sample_batch(corpus.valid, batch, seq, valid_gen) for _ in range(valid_batches)]
    held_out = [(x.to(device), y.to(device)) for x, y in held_out]
    opt = torch.optim.AdamW(_decay_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    record = TrainRecord()

    def checkpoint(step: int) -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            W = query_head_weights(model).to(torch.float64)
            record.steps.append(step)
            record.R.append(head_overlap(W).tolist())
            record.q_norm.append(W.square().sum(dim=(1, 2, 3)).sqrt().tolist())
            record.valid_loss.append(sum(float(model.loss(x, y)) for x, y in held_out) / len(held_out))
        model.train(was_training)

    model.train()
    checkpoint(0)
    iterator = range(steps) if progress is None else progress(range(steps))
    for step in iterator:
        x, y = sample_batch(corpus.train, batch, seq, generator)
        record.loss.append(_recipe_step(model, opt, model.loss(x.to(device), y.to(device)), step, lr, warmup))
        if (step + 1) % every == 0 or step + 1 == steps:
            checkpoint(step + 1)
    return record


# --------------------------------------------------------------------------- training runs saved as revisions


def pythia_schedule(steps: int, every: int) -> list[int]:
    """Checkpoint steps spaced as Pythia's (``step0``, ``step1``, ``step2``, ``step4``, ... ``step512``, then every
    1000 steps): 0, the powers of two below ``every``, then every ``every`` steps, and ``steps`` itself."""
    steps, every = _as_int("steps", steps), _as_int("every", every)
    if steps < 1 or every < 1:
        raise ValueError(f"need steps >= 1 and every >= 1, got steps={steps}, every={every}")
    powers = [2**i for i in range(every.bit_length()) if 2**i < every]
    return sorted({0, *(p for p in powers if p <= steps), *range(every, steps + 1, every), steps})


def train_revisions(
    run_dir,
    corpus: CharCorpus,
    *,
    save_at: Sequence[int],
    d: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    seq: int = 32,
    batch: int = 16,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    warmup: int = 25,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> list[float]:
    """Train a small GPT-NeoX (Pythia's architecture: rotary embeddings on a quarter of each head, parallel
    attention and MLP, fused per-head-interleaved query/key/value weight; transformers'
    ``GPTNeoXForCausalLM``, initialised N(0, 0.02^2) as Pythia) on a character corpus, and save it at every
    step in ``save_at`` (0 = the initialisation) as the revision ``run_dir/step<t>``, then ``run_dir/main``,
    a byte-identical copy of the last (Pythia's ``main`` is its final step). Each revision is what
    ``save_pretrained`` writes: ``config.json`` and ``model.safetensors``. Returns the training loss of
    every step.

    The recipe is :func:`train_lm`'s: AdamW (betas 0.9, 0.95), gradient clipping at norm 1, linear warm-up
    over ``warmup`` steps then constant ``lr``, decoupled ``weight_decay`` on every weight matrix and none
    on LayerNorm gains and biases. ``seed`` fixes the initialisation (drawn under a forked global RNG, so
    the caller's is untouched, on the CPU whatever ``device``) and the batches; the training runs on
    ``device``, and on the CPU on one thread (:func:`flagcore.reproducible.one_cpu_thread`), so the saved
    bytes do not depend on the core count.
    """
    import shutil
    from pathlib import Path

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from .reproducible import one_cpu_thread

    if not isinstance(corpus, CharCorpus):
        raise TypeError(f"corpus must be a CharCorpus, got {type(corpus).__name__}")
    save_at = sorted({_as_int("save_at", s) for s in save_at})
    if not save_at or save_at[0] < 0:
        raise ValueError(f"save_at must list steps >= 0, got {save_at}")
    d, n_layers, n_heads, seq, batch, warmup = (
        _as_int(n, v) for n, v in (("d", d), ("n_layers", n_layers), ("n_heads", n_heads), ("seq", seq),
                                   ("batch", batch), ("warmup", warmup)))
    if d % n_heads:
        raise ValueError(f"d = {d} must be a multiple of n_heads = {n_heads}")
    lr, weight_decay = float(lr), float(weight_decay)
    if not (math.isfinite(lr) and lr > 0) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"need lr > 0 and weight_decay >= 0 (finite), got lr={lr}, weight_decay={weight_decay}")
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir} is not empty; a run directory holds one run's revisions only")
    config = GPTNeoXConfig(vocab_size=corpus.vocab_size, hidden_size=d, num_attention_heads=n_heads,
                           num_hidden_layers=n_layers, intermediate_size=4 * d, max_position_embeddings=seq,
                           rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
                           initializer_range=0.02, attention_dropout=0.0, hidden_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
    device = torch.device(device)
    model.to(device)
    generator = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.AdamW(_decay_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    losses: list[float] = []
    last = save_at[-1]
    with one_cpu_thread(device):
        model.train()
        if save_at[0] == 0:
            model.save_pretrained(run_dir / "step0")
        iterator = range(last) if progress is None else progress(range(last))
        for step in iterator:
            x, y = (t.to(device) for t in sample_batch(corpus.train, batch, seq, generator))
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, corpus.vocab_size), y.reshape(-1))
            losses.append(_recipe_step(model, opt, loss, step, lr, warmup))
            if step + 1 in save_at:
                model.save_pretrained(run_dir / f"step{step + 1}")
    shutil.copytree(run_dir / f"step{last}", run_dir / "main")
    return losses
