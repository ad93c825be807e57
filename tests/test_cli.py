"""The command-line face: `python -m flagcore info`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import flagcore
from flagcore.cli import main


def test_info_json_reports_versions_and_device(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["flagcore"] == flagcore.__version__
    assert info["torch"] == torch.__version__
    assert info["device"] == str(flagcore.default_device())


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "flagcore", "info"], capture_output=True, text=True, check=True).stdout
    assert "flagcore" in out and "device" in out


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit) as exc:
        main(["nonsense"])
    assert exc.value.code == 2


def test_resolve_device():
    assert flagcore.resolve_device("auto") == flagcore.default_device()
    assert flagcore.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            flagcore.resolve_device("cuda")
