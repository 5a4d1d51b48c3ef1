"""The wheel ships configs and recipes as package data: `rexft --help` works outside the checkout."""

import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_wheel_runs_from_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("rexft-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    assert (target / "rexft" / "_configs" / "recipes" / "commonsense14.yaml").is_file()
    assert (target / "bin" / "rexft").is_file()  # the console script
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "rexft", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "commonsense14" in out.stdout and "zero3" in out.stdout
    printed = subprocess.run([sys.executable, "-m", "rexft", "train", "recipe=commonsense14", "--print-config"], cwd=tmp_path,
                             env=env, capture_output=True, text=True)
    assert printed.returncode == 0 and "meta-llama/Llama-2-13b-hf" in printed.stdout
