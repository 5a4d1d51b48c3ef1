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


FAST_MOVING = ("torch", "transformers", "datasets", "accelerate", "deepspeed", "peft", "bitsandbytes", "tokenizers")


def test_fast_moving_dependencies_are_bounded_and_the_installed_versions_are_within():
    """Each fast-moving dependency has an upper bound, and the environment the tests run in satisfies every
    declared range (so the bounds name versions the suite ran on)."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    declared = {Requirement(r).name: Requirement(r) for r in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name in FAST_MOVING:
        assert any(spec.operator in ("<", "<=") for spec in declared[name].specifier), f"{name}: no upper bound"
    for name, requirement in declared.items():
        assert requirement.specifier.contains(version(name), prereleases=True), (name, version(name), requirement)
