"""A library error names the option as its caller spelled it: the Python parameter (``top_k``) for a Python call,
the CLI flag (``--top-k``) under the CLI, with the same sentence around it."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import artifactscan
from artifactscan.cli import app
from artifactscan.core.errors import InputError, cli_spelling, option, os_problem, uses_cli_spelling

runner = CliRunner()


def test_option_spells_parameters_in_python_and_flags_under_the_cli():
    assert (option("top_k"), option("layer", 99), option("trust_checkpoint", True)) == (
        "top_k", "layer=99", "trust_checkpoint=True")
    with cli_spelling():
        assert uses_cli_spelling()
        assert (option("top_k"), option("layer", 99), option("trust_checkpoint", True)) == (
            "--top-k", "--layer 99", "--trust-checkpoint")
        assert (option("num_maps"), option("embed_dim", 64)) == ("--maps", "--dim 64")  # not the mechanical form
        assert option("arch_kwargs", "{}", shell_value="'{}'") == "--arch-kwargs '{}'"
    assert not uses_cli_spelling()  # the spelling ends with the command
    assert option("arch_kwargs", "{}", shell_value="'{}'") == "arch_kwargs={}"


def test_os_advice_names_the_option_as_spelled():
    import errno

    exc = OSError(errno.ENOMEM, "Cannot allocate memory")
    assert os_problem(exc).endswith("use a smaller batch_size or free memory")
    with cli_spelling():
        assert os_problem(exc).endswith("use a smaller --batch-size or free memory")


def test_python_call_names_the_parameter():
    with pytest.raises(InputError) as info:
        artifactscan.fix("demo", "synthetic:4", top_k=0)
    assert str(info.value) == "top_k must be at least 1, got 0"
    with pytest.raises(InputError, match=r"^blocks=99 is out of range: this model has \d+ blocks"):
        artifactscan.probe("demo", "synthetic:4", blocks=99)


@pytest.mark.parametrize("args, line", [
    (["fix", "demo", "synthetic:4", "--top-k", "0"], "error: --top-k must be at least 1, got 0"),
    (["probe", "demo", "synthetic:4", "--blocks", "99"], "error: --blocks 99 is out of range: this model has"),
    (["phantom", "--build", "--gain", "0.5", "--save-model", "{tmp}/p.safetensors"], "error: --gain 0.5 must be above 1"),
])
def test_cli_names_the_flag(args, line, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1].startswith(line), result.stderr
    assert "blocks=" not in result.stderr and "top_k" not in result.stderr and "gain_over_median" not in result.stderr
