"""The arithmetic and parsing of the GPU resource checks (scripts/gpu_limits.py,
scripts/cuda_resources.py), which CI runs without a GPU. The compiles themselves run in
`make cuda-check` and `make gpu-compile-check`, not here (minutes, not seconds).

Occupancy references are worked out by hand from NVIDIA's limits (65536 registers and 2048
threads per SM, registers allocated per warp in 256s across 4 schedulers, 1 KB of shared memory
reserved per block, 228 KB per SM on sm_90 and 164 KB on sm_80).
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
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
