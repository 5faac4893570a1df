"""benchmarks/gpu_check.sh, the one GPU check, where it can be checked without a GPU: its
syntax, its --bundle output, its compute-sanitizer steps (with a stand-in for compute-sanitizer
that records how it was called), and the selection of tests those steps run again. A GPU session has one
call of the script: a slip found there costs the session's device time."""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _function(name: str) -> str:
    text = SCRIPT.read_text()
    match = re.search(rf"^{name}\(\) \{{.*?^\}}$|^{name}\(\) \{{.*\}}$", text, flags=re.S | re.M)
    assert match, f"gpu_check.sh has no {name}() function"
    return match.group(0)


def test_bundle_leaves_few_files_and_the_logs_are_written_as_the_run_goes(tmp_path):
    # A lent GPU machine brings back at most 8 files from $OUT; the steps write ~20. The
    # summary and every step's output go straight into the destination while the run goes
    # (a call killed mid-way still leaves them); at exit the plots and a tarball of the rest.
    run, dest = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    dest.mkdir()
    program = "\n".join([_function("log"), _function("step"), _function("bundle"),
                         f"OUT={run} BUNDLE_TO={dest} LIVE_SUMMARY={dest}/gpu_check.log "
                         f"LIVE_STEPS={dest}/gpu_check_steps.log BUDGET=100 status=0",
                         "step build 20 echo built", "step tests 20 bash -c 'echo ran; exit 3'",
                         "echo png > $OUT/sinkhorn.png; echo a,b > $OUT/sinkhorn.csv",
                         "cp $LIVE_STEPS $OUT/../steps_before_exit.log", "bundle", "echo status=$status"])
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "status=1" in done.stdout, done
    assert (tmp_path / "steps_before_exit.log").read_text() == "=== build\nbuilt\n=== tests\nran\n"
    assert sorted(p.name for p in dest.iterdir()) == ["gpu_check.log", "gpu_check.tar.gz", "gpu_check_steps.log",
                                                      "sinkhorn.png"]
    summary = (dest / "gpu_check.log").read_text()
    assert "== build (limit 20s)" in summary and "== tests FAILED (exit 3)" in summary
    with tarfile.open(dest / "gpu_check.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"build.log", "tests.log", "gpu_check.log", "sinkhorn.csv", "sinkhorn.png"} <= names
    assert not run.exists()


def _run_sanitize(tmp_path, sanitizer: str, *args: str):
    """sanitize() from the script, run alone, with PY and the step's limit as the script sets them."""
    program = (f"{_function('log')}\n{_function('sanitize')}\nPY=python-stand-in; limit=30; OUT={tmp_path}\n"
               f"LIVE_SUMMARY=/dev/null CUDACXX=/nonexistent/nvcc\nsanitize {' '.join(args)}\n")
    env = {**os.environ, "COMPUTE_SANITIZER": sanitizer}
    return subprocess.run(["bash", "-c", program], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=60)


def test_sanitize_runs_the_memcheck_tests_under_the_tool_with_torchs_cache_off(tmp_path):
    record = tmp_path / "call.txt"
    stand_in = tmp_path / "compute-sanitizer"
    stand_in.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "PYTORCH_NO_CUDA_MEMORY_CACHING=$PYTORCH_NO_CUDA_MEMORY_CACHING" '
                        f'"$@" > {record}\nexit 86\n')
    stand_in.chmod(0o755)
    done = _run_sanitize(tmp_path, str(stand_in), "racecheck", "kns=pym4", "'regex=^_x_kernel$'", "--",
                         "tests/test_sinkhorn_cuda.py")
    assert done.returncode == 86, done  # the tool's verdict is the step's
    call = record.read_text().split("\n")
    assert call[0] == "PYTORCH_NO_CUDA_MEMORY_CACHING=1"  # each tensor its own allocation
    args = call[1:]
    assert args[args.index("--tool") + 1] == "racecheck"
    assert args[args.index("--error-exitcode") + 1] == "86"
    filters = [args[i + 1] for i, a in enumerate(args) if a == "--kernel-name"]
    assert filters == ["kns=pym4", "regex=^_x_kernel$"]  # one option each: compute-sanitizer adds them up
    program = args[args.index("python-stand-in"):]
    assert program[:3] == ["python-stand-in", "-m", "pytest"]
    assert program[program.index("-m", 3) + 1] == "memcheck" and "tests/test_sinkhorn_cuda.py" in program


def test_sanitize_without_the_tool_says_so_and_does_not_fail_the_check(tmp_path):
    done = _run_sanitize(tmp_path, str(tmp_path / "absent"), "memcheck", "kns=pym4", "--", "tests")
    assert done.returncode == 0
    assert "== memcheck SKIPPED: compute-sanitizer not found" in done.stdout  # in the summary too
    assert "memcheck SKIPPED" in (tmp_path / "gpu_check.log").read_text()


def _collected(marker: str) -> list:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", marker, "tests"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode in (0, 5), done.stdout[-2000:] + done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


@pytest.mark.slow
def test_memcheck_selection_reaches_every_gpu_kernel_family_and_only_gpu_tests():
    chosen = _collected("memcheck")
    by_file = {line.split("::")[0] for line in chosen}
    assert by_file == {"tests/test_sinkhorn_cuda.py", "tests/test_m4.py", "tests/test_sinkhorn_triton.py",
                       "tests/test_contrastive_triton.py"}, by_file
    names = " ".join(chosen)
    for needed in ("test_both_launch_paths", "test_group_uses_the_cuda_kernel",  # solve paths, group= passes
                   "test_many_prototypes_without_shared_memory", "test_epsilon_001",  # workspace, log domain
                   "test_features_form_uses_the_cuda_kernel", "test_cuda_stream_and_keep_probability_match_cpu"):
        assert needed in names, needed
    # Small on purpose (one GPU call holds the whole check): under a hundred cases.
    assert 20 <= len(chosen) < 100, len(chosen)
    assert _collected("memcheck and not gpu") == []  # on a CPU they would only be skipped there


def test_memcheck_filter_names_every_triton_kernel():
    # Kernels outside the filter run unchecked: a new @triton.jit kernel must be added to it.
    match = re.search(r"^TRITON_KERNELS='(.*)'$", SCRIPT.read_text(), flags=re.M)
    assert match
    pattern = re.compile(match.group(1))
    launched = []
    for source in (ROOT / "kernels").glob("*.py"):
        launched += re.findall(r"^(\w+)\[", "\n".join(l.strip() for l in source.read_text().splitlines()), flags=re.M)
    kernels = {name for name in launched if name.endswith("_kernel")}
    assert {"_row_kernel", "_column_kernel", "_combine_kernel", "_clip_lse_kernel", "_clip_grad_kernel",
            "_siglip_fwd_kernel", "_siglip_grad_kernel"} <= kernels, kernels
    assert all(pattern.search(name) for name in kernels), [n for n in kernels if not pattern.search(n)]
    # and the step passes both filters: pym4's CUDA kernels (namespace pym4::cuda) and these
    assert re.search(r"^step memcheck \d+ sanitize memcheck kns=pym4 \"regex=\$TRITON_KERNELS\" -- tests$",
                     SCRIPT.read_text(), flags=re.M)
