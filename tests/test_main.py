"""`python -m zerocore` (zerocore/__main__.py): every subcommand has --help and runs for real. (estimate and
consolidate are also run by tests/test_estimate.py and tests/test_zero_checkpoint.py.)"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The checkout's zerocore, not whichever copy is pip-installed; no GPU even where one exists.
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(
    [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "zerocore", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("command,mentions", [
    ("report", "op"), ("build", "compile"), ("estimate", "--world-size"), ("consolidate", "safetensors"),
    ("demo", "--nproc")])
def test_every_subcommand_has_help(command, mentions):
    out = run(command, "--help")
    assert out.returncode == 0 and "usage: python -m zerocore " + command in out.stdout, out.stderr
    assert mentions in out.stdout


def test_top_level_help_lists_every_subcommand():
    out = run("--help")
    assert out.returncode == 0
    for command in ("report", "build", "estimate", "consolidate", "demo"):
        assert command in out.stdout


def test_report_names_every_op():
    out = run("report")
    assert out.returncode == 0, out.stderr
    for op in ("cpu_adam", "buckets", "aio", "host_cache"):
        assert op in out.stdout


def test_build_of_a_built_op_returns_its_folder():
    out = run("build", "cpu_adam")
    assert out.returncode == 0 and out.stdout.startswith("cpu_adam: built in "), out.stdout + out.stderr


def test_build_of_an_unknown_op_fails_naming_it():
    out = run("build", "no_such_op")
    assert out.returncode != 0 and "no_such_op" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--stage", "3"], ["--stage", "1", "--offload", "--dtype", "bf16"]])
def test_demo_trains_on_two_ranks(extra):
    """The packaged demo through torchrun: training output, a per-rank memory table, a clean exit."""
    out = run("demo", "--nproc", "2", "--steps", "6", "--width", "64", *extra)
    # torchrun stops the other rank when one dies and exits non-zero, naming the rank and its signal.
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "terminate called" not in out.stderr, out.stderr[-3000:]
    assert "step   5  loss" in out.stdout and "median step time" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.strip().startswith(("0 |", "1 |"))]
    assert len(rows) == 2, out.stdout
