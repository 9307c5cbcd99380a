"""What an installed ivpt (not a checkout) needs: the wheel carries the training, evaluation and demo code with the
demo's recipe, and declares the console scripts; the installed commands run from a folder outside the checkout."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"ivpt-train": "ivpt.training.run:cli", "ivpt-evaluate": "ivpt.evaluation.cli:console_entry",
           "ivpt-app": "ivpt.app:main"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (path,) = out.glob("ivpt-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_carries_the_workflows_and_the_demo_recipe(wheel):
    names = set(wheel.namelist())
    for member in ("ivpt/recipes/demo.yaml", "ivpt/demo.py", "ivpt/training/run.py", "ivpt/evaluation/cli.py",
                   "ivpt/app.py"):
        assert member in names, member
    (entry_points,) = [name for name in names if name.endswith("entry_points.txt")]
    text = wheel.read(entry_points).decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in text


def test_demo_recipe_is_found_inside_the_package():
    from ivpt.demo import DEFAULT_RECIPE

    assert DEFAULT_RECIPE.is_file() and DEFAULT_RECIPE.parent.parent == Path(__import__("ivpt").__file__).parent


@pytest.mark.parametrize("script", ["ivpt-train", "ivpt-evaluate"])
def test_installed_command_runs_outside_the_checkout(script, tmp_path):
    executable = Path(sys.executable).parent / script
    assert executable.exists(), f"{executable}: run `make install` (the console scripts come with the install)"
    env = dict(os.environ, PYTHONPATH="")
    result = subprocess.run([str(executable), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--output_dir" in result.stdout and "--model_name_or_path" in result.stdout
