"""Per-architecture resource limits and the spill budget shared by the two GPU resource checks.

scripts/gpu_compile_check.py (Triton kernels) and scripts/cuda_resources.py (CUDA kernels)
both import this module, so the arch limits and the budget are stated once. Figures are
NVIDIA's (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability", and
the occupancy calculator's allocation granularities), for the GPUs pym4 targets.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass

# Bytes of local memory per thread a kernel may spill (CUDA: ptxas "spill stores"; Triton:
# the cubin's stack frame, which for Triton kernels holds nothing but spills). Local memory
# is DRAM behind L1: a few words of spill around a barrier cost little, hundreds of bytes in
# an inner loop make a kernel several times slower.
SPILL_BUDGET_BYTES = 64


@dataclass(frozen=True)
class Arch:
    cc: int                 # compute capability x 10 (80, 90)
    gpu: str                # the GPU the co-residency figures are for
    sms: int                # multiprocessors of that GPU
    smem_per_block: int     # largest shared memory one block may opt in to (bytes)
    smem_per_sm: int        # shared memory of one multiprocessor (bytes)
    smem_reserved: int = 1024   # per block, taken by the system on sm_80+
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    reg_unit: int = 256         # registers are allocated per warp in units of 256
    sub_partitions: int = 4     # the register file is split between 4 schedulers
    smem_unit: int = 128        # shared memory is allocated per block in units of 128 bytes

    def blocks_per_sm(self, threads: int, regs: int, smem: int) -> int:
        """Blocks of `threads` threads, `regs` registers each and `smem` bytes of shared memory
        (static + dynamic) resident at once on one SM, as cudaOccupancyMaxActiveBlocksPerMultiprocessor
        computes it (cuda_occupancy.h): the least of the thread, block, register and shared-memory limits."""
        if regs > self.max_regs_per_thread or smem > self.smem_per_block:
            return 0
        warps = -(-threads // 32)
        by_threads = self.max_threads_per_sm // (warps * 32)
        per_warp = -(-max(regs, 1) * 32 // self.reg_unit) * self.reg_unit
        warps_by_regs = (self.regs_per_sm // self.sub_partitions // per_warp) * self.sub_partitions
        by_regs = warps_by_regs // warps
        per_block = -(-(smem + self.smem_reserved) // self.smem_unit) * self.smem_unit
        by_smem = self.smem_per_sm // per_block
        return max(0, min(by_threads, self.max_blocks_per_sm, by_regs, by_smem))


# sm_90: H100 / H200 (SXM, 132 SMs), 228 KB shared memory per SM, 227 KB per block.
# sm_80: A100 (108 SMs), 164 KB per SM, 163 KB per block (opt-in above 48 KB on both).
ARCHS = {
    90: Arch(cc=90, gpu="H100/H200", sms=132, smem_per_block=227 * 1024, smem_per_sm=228 * 1024),
    80: Arch(cc=80, gpu="A100", sms=108, smem_per_block=163 * 1024, smem_per_sm=164 * 1024),
}


def arch(cc: int) -> Arch:
    """The limits of compute capability `cc` (80 or 90)."""
    if cc not in ARCHS:
        raise ValueError(f"arch: no resource limits known for sm_{cc} (known: {sorted(ARCHS)})")
    return ARCHS[cc]


def native_arch() -> int:
    """Compute capability x 10 of GPU 0, from nvidia-smi (no CUDA context in the calling
    process, whose workers may be forked)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout.split()
        major, minor = out[0].split(".")
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError) as e:
        raise SystemExit(f"arch native: nvidia-smi reports no GPU ({e})")
    return 10 * int(major) + int(minor)


def fmt_kb(n: int) -> str:
    return f"{n / 1024:.1f} KB"
