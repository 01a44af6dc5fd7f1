"""``python -m ktsft info`` and ``python -m ktsft demo`` as a user runs them.

Each runs in a fresh interpreter (sys.executable) from a temporary directory, so the installed
package is imported, not the source tree next to the tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import ktsft


def _run(args, cwd, env=None, timeout=120):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KTSFT_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "ktsft", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_info_prints_json(tmp_path):
    proc = _run(["info"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    for key in ("isa", "available", "compiled"):
        assert key in info, key
    assert info["isa"] in info["available"]
    assert set(info["available"]) <= set(info["compiled"])
    assert "generic" in info["available"]  # the portable family runs everywhere
    # the same answer as the in-process API
    here = ktsft.runtime_info()
    assert info["isa"] == here["best"]
    assert info["available"] == here["available"] and info["compiled"] == here["compiled"]


def test_info_reports_env_choices(tmp_path):
    proc = _run(["info"], tmp_path, env={"KTSFT_ISA": "generic", "KTSFT_NUM_THREADS": "3"})
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["isa"] == "generic"
    assert info["num_threads"] == 3


def test_info_with_an_unavailable_isa_says_why(tmp_path):
    proc = _run(["info"], tmp_path, env={"KTSFT_ISA": "no-such-family"})
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["isa"] is None
    assert "no-such-family" in info["isa_error"] and "generic" in info["isa_error"]


def test_no_command_is_a_usage_error(tmp_path):
    proc = _run([], tmp_path)
    assert proc.returncode == 2
    assert "usage" in proc.stderr.lower()


@pytest.fixture(scope="module", params=[0, 1], ids=lambda s: f"seed{s}")
def demo(request, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    args = [
        "demo",
        "--steps",
        "6",
        "--tokens",
        "32",
        "--threads",
        "2",
        "--seed",
        str(request.param),
    ]
    return _run(args, cwd)


def test_demo_prints_loss_speed_and_kernel_family(demo):
    out = demo.stdout
    assert re.search(r"loss [0-9.e+-]+ -> [0-9.e+-]+", out), out + demo.stderr
    assert "tokens/s" in out, out
    assert ktsft.runtime_info()["best"] in out, out  # the subprocess runs without KTSFT_ISA
    assert "Traceback" not in demo.stderr, demo.stderr


def test_demo_exits_zero(demo):
    """A short demo run (any seed) is a smoke test that ran to the end: exit status 0. Six
    steps are too few for the loss to fall reliably, so the status must not hinge on it."""
    assert demo.returncode == 0, f"exit {demo.returncode}\n{demo.stdout}\n{demo.stderr}"
