"""The README's examples run: the bash block of "One example per command" line by line, then the Python block after
it, in README order, in one new folder, the way someone who cloned the repository types them there (sample_images/
is a copy of the repository's). The quick start's install and test lines are left out: CI runs those itself.

One setting is not the README's: train-reg trains a few steps (ARTIFACTSCAN_TRAIN_STEPS, docs/development.md)
instead of the demo's 1,600, which take most of an hour."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from artifactscan.analysis.training import STEPS_ENV, get_preset
from artifactscan.core.errors import TrainingError

from .conftest import REPO, SAMPLE_IMAGES

SECTION = "## One example per command"
TRAIN_STEPS = "4"


def readme_examples(text: str) -> tuple[list[str], str]:
    """The command lines of the section's bash block and its Python block."""
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w+)\n(.*?)^```", section, re.M | re.S)
    bash = [body for lang, body in blocks if lang == "bash"]
    python = [body for lang, body in blocks if lang == "python"]
    assert len(bash) == 1 and len(python) == 1, f"{SECTION} should hold one bash and one python block"
    commands = bash[0].replace("\\\n", " ")  # a command continued with a backslash is one line
    lines = [line for line in commands.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return lines, python[0]


def written_paths(line: str) -> list[str]:
    """What a command line's --out / -o names: it must exist once the command has run."""
    words = shlex.split(line, comments=True)
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "-o")]


def test_readme_examples_run_in_order(tmp_path):
    lines, python = readme_examples((REPO / "README.md").read_text(encoding="utf-8"))
    assert [shlex.split(line, comments=True)[0] for line in lines] == ["artifactscan"] * len(lines)
    bin_dir = Path(sys.executable).parent  # where this environment installed the artifactscan command
    assert (bin_dir / "artifactscan").is_file(), "the artifactscan command is not installed here (pip install -e .)"
    shutil.copytree(SAMPLE_IMAGES, tmp_path / "sample_images")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           STEPS_ENV: TRAIN_STEPS}
    env.pop("ARTIFACTSCAN_DEBUG", None)

    failures = []
    for line in lines:
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        missing = [p for p in written_paths(line) if not (tmp_path / p).exists()]
        if done.returncode != 0 or missing or "Traceback" in done.stderr:
            failures.append(f"{line}\n  exit {done.returncode}, missing {missing}: {done.stderr[-600:]}")
    done = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0 or not done.stdout.strip():
        failures.append(f"the Python block\n  exit {done.returncode}: {done.stderr[-600:]}")
    assert not failures, "README examples failed:\n" + "\n".join(failures)
    # what the examples promise in their comments, beyond their --out paths
    assert {"report.json", "outliers.csv"} <= {p.name for p in (tmp_path / "report").iterdir()}
    assert (tmp_path / "runs" / "demo-pair" / "held_out_comparison.json").is_file()


def test_train_steps_setting(monkeypatch):
    monkeypatch.setenv(STEPS_ENV, "6")
    config = get_preset()
    assert (config.steps, config.ckpt_every) == (6, 3)  # a snapshot halfway: the run keeps a checkpoint history
    assert get_preset(steps=10).steps == 10  # what the user asked for wins
    assert get_preset(epochs=2).steps is None
    monkeypatch.setenv(STEPS_ENV, "0")
    with pytest.raises(TrainingError, match=STEPS_ENV):
        get_preset()
    monkeypatch.setenv(STEPS_ENV, "")
    assert get_preset().steps == 1600
