"""The GPU resource checks CI runs without a GPU (scripts/gpu_limits.py, cuda_resources.py,
gpu_compile_check.py): occupancy arithmetic, ptxas parsing, the launcher model, and the Triton
check end to end on one tiny kernel. The real kernels compile in `make cuda-check` and
`make gpu-compile-check` (minutes, not seconds), not here.

Occupancy references are worked out by hand from NVIDIA's limits (65536 registers and 2048
threads per SM, registers allocated per warp in 256s across 4 schedulers, 1 KB of shared memory
reserved per block, 228 KB per SM on sm_90 and 164 KB on sm_80).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import cuda_resources  # noqa: E402
import gpu_limits  # noqa: E402

H100, A100 = gpu_limits.arch(90), gpu_limits.arch(80)


@pytest.mark.parametrize("arch,threads,regs,smem,want", [
    (H100, 512, 64, 4096, 2),          # the fused Sinkhorn kernel: 2 x 512 x 64 = the register file
    (H100, 512, 65, 4096, 1),          # one register more: 72 per thread, 1 block
    (H100, 256, 32, 0, 8),             # thread limit: 2048 / 256
    (H100, 64, 16, 0, 32),             # block limit
    (H100, 256, 255, 0, 1),            # 256 x 255 -> 8 warps x 8192 registers = all of them
    (H100, 512, 32, 100 * 1024, 2),    # shared memory: 228 KB / 101 KB
    (A100, 512, 32, 100 * 1024, 1),    # 164 KB / 101 KB
    (A100, 512, 32, 164 * 1024, 0),    # above the 163 KB a block may opt in to
    (H100, 512, 256, 0, 0),            # above 255 registers a thread
])
def test_blocks_per_sm(arch, threads, regs, smem, want):
    assert arch.blocks_per_sm(threads, regs, smem) == want


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="sm_75"):
        gpu_limits.arch(75)


PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN4pym44cuda12_GLOBAL__N_121sinkhorn_fused_kernelIfEEvNS1_6ParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN4pym44cuda12_GLOBAL__N_121sinkhorn_fused_kernelIfEEvNS1_6ParamsE
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size, 4096 bytes smem
ptxas info    : Compile time = 8625.653 ms
ptxas info    : Compiling entry function '_Z15m4_batch_kernelILb1EEvPKhS1_' for 'sm_80'
ptxas info    : Function properties for _Z15m4_batch_kernelILb1EEvPKhS1_
    0 bytes stack frame, 300 bytes spill stores, 300 bytes spill loads
ptxas info    : Used 51 registers, used 0 barriers
"""


def test_parse_ptxas_reads_every_entry_and_its_resources():
    kernels = {(k.name, k.arch): k for k in cuda_resources.parse_ptxas(PTXAS)}
    assert set(kernels) == {("sinkhorn_fused_kernel<float>", 90), ("m4_batch_kernel<true>", 80)}
    fused = kernels["sinkhorn_fused_kernel<float>", 90]
    assert (fused.regs, fused.stack, fused.spill_stores, fused.spill_loads, fused.smem) == (64, 8, 12, 16, 4096)
    m4 = kernels["m4_batch_kernel<true>", 80]
    assert (m4.regs, m4.spill_stores, m4.smem) == (51, 300, 0)
    errors = cuda_resources.report(list(kernels.values()), budget=64)
    assert len(errors) == 1 and "m4_batch_kernel<true> sm_80" in errors[0]


CONSTS = {"kThreads": 512, "kMinBlocksPerSm": 2, "kMinRowsPerPart": 2, "kMaxParts": 320,
          "kMaxPartialEntries": 1 << 22, "kFusedMaxElements": 1 << 25}


@pytest.mark.parametrize("rows,cols,resident,want", [
    (1, 3000, 264, 1),          # one row: one block
    (3, 3000, 264, 2),          # kMinRowsPerPart 2: 2 parts, rows 0-1 and 2
    (4096, 3000, 264, 256),     # rows 16 per part -> 256 parts (no empty part)
    (4096, 3000, 10_000, 316),  # the kMaxParts cap: 13 rows per part -> 316 parts
    (2097, 16000, 108, 105),    # 20 rows per part (ceil 2097 / 108) -> 105 parts
    (100_000, 65536, 264, 64),  # partials cap: 2^22 / 65536 = 64
])
def test_fused_request_models_the_launcher(rows, cols, resident, want):
    assert cuda_resources.fused_request(rows, cols, resident, CONSTS) == want


def test_coresidency_flags_a_launcher_that_asks_for_too_many(monkeypatch):
    fused = cuda_resources.parse_ptxas(PTXAS)[1]
    assert fused.name.startswith("sinkhorn_fused_kernel")
    monkeypatch.setattr(cuda_resources, "launcher_clamps", lambda: True)
    lines, errors = cuda_resources.coresidency([fused], CONSTS)
    assert errors == [] and any("264 co-resident" in line for line in lines)
    # Without the occupancy clamp the launcher would ask for kMaxParts = 320 > 2 x 132.
    monkeypatch.setattr(cuda_resources, "launcher_clamps", lambda: False)
    _, errors = cuda_resources.coresidency([fused], CONSTS)
    assert any("asks for 320 blocks, 264 are co-resident" in e for e in errors)


def test_launch_constants_are_read_from_cuda_h():
    consts = cuda_resources.launch_constants()
    assert set(CONSTS) <= set(consts)
    assert consts["kFusedMaxElements"] == 1 << 25 and consts["kThreads"] % 32 == 0
    assert cuda_resources.check_source_agrees(consts) == []


TINY_KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)


def compile_configs():
    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}
    for block in (256, 100):  # 100: tl.arange needs a power of two, the compile fails
        yield {"name": f"double[{block}]", "fn": _double_kernel, "signature": sig, "constexprs": {"BLOCK": block},
               "num_warps": 4, "num_stages": 1}
'''


@pytest.fixture
def tiny_kernels(tmp_path):
    pytest.importorskip("triton")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "tiny.py").write_text(TINY_KERNELS)
    (tmp_path / "kernels" / "no_configs.py").write_text("X = 1\n")  # not a kernel module of the check
    return tmp_path


def run_check(root, *args):
    # A process of its own: this one has imported triton under conftest's TRITON_INTERPRET=1,
    # after which nothing compiles natively in it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPTS / "gpu_compile_check.py"), "--root", str(root), "--jobs", "1",
                           *args], capture_output=True, text=True, env=env, timeout=600)


def test_compile_check_discovers_compiles_and_reports(tiny_kernels):
    r = run_check(tiny_kernels, "--arch", "90")
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("double[")}
    assert set(rows) == {"double[256]", "double[100]"}, r.stdout + r.stderr
    fields = rows["double[256]"].split()
    assert fields[1] == "sm_90" and fields[-1] == "ok" and 0 < int(fields[4]) <= 255 and fields[5] == "0"
    assert "COMPILE FAILED" in rows["double[100]"]
    assert r.returncode == 1 and "double[100] sm_90: compile failed" in r.stderr and "power of 2" in r.stderr


def test_compile_check_refuses_interpreter_mode(tiny_kernels):
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(SCRIPTS / "gpu_compile_check.py"), "--root", str(tiny_kernels)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0 and "unset TRITON_INTERPRET" in r.stderr


def test_compile_check_flags_shared_memory_and_spills():
    import gpu_compile_check as gcc
    row = {"regs": 255, "stack": 0, "local": 0, "smem": 200 * 1024}
    assert gcc.judge(row, H100, 64) == []
    assert "above 163.0 KB" in gcc.judge(row, A100, 64)[0]
    assert gcc.judge(dict(row, stack=600), H100, 64) == ["spills 600 B > 64 B"]


def test_compile_check_refuses_a_config_that_misnames_arguments():
    import gpu_compile_check as gcc

    class FakeKernel:
        arg_names = ["x_ptr", "y_ptr", "n", "BLOCK"]
    cfg = {"name": "k", "fn": FakeKernel(), "signature": {"x_ptr": "*fp32", "n": "i32"}, "constexprs": {"BLOCK": 4},
           "num_warps": 4, "num_stages": 1}
    with pytest.raises(SystemExit, match="the kernel takes"):
        gcc.validate(cfg, "tiny.py")
    with pytest.raises(SystemExit, match="argument order"):
        gcc.validate(dict(cfg, signature={"y_ptr": "*fp32", "x_ptr": "*fp32", "n": "i32"}), "tiny.py")
    assert gcc.validate(dict(cfg, signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}), "tiny.py")["module"] == "tiny.py"
