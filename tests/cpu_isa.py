"""Running the emulator with a forced kernel set (XDNA_EMULATOR_ISA) in a subprocess, and what this CPU has.

The kernel set is chosen once per process, so every forced set runs in its own. A set the CPU lacks is refused
by the emulator with a message; the callers skip then, except where /proc/cpuinfo says the CPU has it: there a
refusal fails the test (for AMX unless Linux itself refused the tile state, which the emulator logs).
"""

import os
import subprocess
import sys

import pytest

import onnxruntime_ep_xdna

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
AMX_FLAGS = {"amx_tile", "amx_bf16", "amx_int8", "avx512_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
AMX_REFUSED_BY_LINUX = "did not grant the tile state"


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


CPU_HAS_AMX = AMX_FLAGS <= cpu_flags()


def run_with_isa(isa, script, *args, env_extra=None, timeout=600):
    """python -c script args... with XDNA_EMULATOR_ISA=isa ("" = the default choice); the installed package and
    tests/ (numerics) importable."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(onnxruntime_ep_xdna.__file__)))
    env = dict(os.environ, XDNA_EMULATOR_ISA=isa,
               PYTHONPATH=os.pathsep.join([package_root, TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_pytest_with_isa(isa, *pytest_args, timeout=1200):
    """python -m pytest pytest_args... from tests/ with XDNA_EMULATOR_ISA=isa."""
    env = dict(os.environ, XDNA_EMULATOR_ISA=isa)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *pytest_args], env=env,
                          cwd=TESTS_DIR, capture_output=True, text=True, timeout=timeout)


def unavailable(isa, proc):
    """True when the emulator refused the forced set (the caller skips it); fails the test where this CPU has AMX
    and Linux granted it, yet the amx set was refused."""
    if "not available on this CPU" not in proc.stderr:
        return False
    if isa == "amx" and CPU_HAS_AMX and AMX_REFUSED_BY_LINUX not in proc.stderr:
        pytest.fail(f"the CPU has AMX but the amx kernels were refused:\n{proc.stderr}")
    return True


def check_with_isa(isa, script, timeout=600):
    """`script` (which prints "ok") under the forced kernel set `isa`: skipped where the emulator refuses that set
    (see unavailable), else it must have run that very set and passed."""
    proc = run_with_isa(isa, script, timeout=timeout)
    if unavailable(isa, proc):
        pytest.skip(f"{isa} kernels not supported here")
    assert proc.returncode == 0, proc.stderr
    assert f"kernels '{isa}' (forced by XDNA_EMULATOR_ISA)" in proc.stderr  # the forced set really ran
    assert proc.stdout.strip() == "ok"


def check_with_int8_isa(int8_isa, script, timeout=600):
    """`script` (which prints "ok") under the forced int8 kernel set `int8_isa` (XDNA_EMULATOR_INT8_ISA), the bf16
    set left to the default choice: skipped where the emulator refuses that set, else it must have run it and
    passed."""
    proc = run_with_isa("", script, env_extra={"XDNA_EMULATOR_INT8_ISA": int8_isa}, timeout=timeout)
    if f"XDNA_EMULATOR_INT8_ISA={int8_isa} is not available" in proc.stderr:
        pytest.skip(f"int8 kernels {int8_isa} not supported here")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"int8 kernels '{int8_isa}' (forced by XDNA_EMULATOR_INT8_ISA)" in proc.stderr
    assert proc.stdout.strip() == "ok"
