"""Peak throughput and memory bandwidth of known devices, for ``dsfs bench``'s "% of peak" columns.

Figures are the vendors' datasheet numbers, dense (no sparsity), matched against the device's name
(`device_name`): ``torch.cuda.get_device_name()``, MLX's ``device_info``, or ``CPU <model>`` (no entry: no %).
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass

# Peak dense throughput (no sparsity) and memory bandwidth from the vendors' datasheets, matched against the
# device's name in order (the first pattern that matches wins, so variants come before the plain name).
# NVIDIA quotes tensor-core figures "with sparsity"; the dense figures here are half of those.


@dataclass(frozen=True)
class Peak:
    """A device's peak figures: ``half`` dense bf16/fp16 tensor TFLOP/s (FP32 accumulate), ``fp32`` TFLOP/s
    (non-tensor), ``fp8`` dense e4m3 tensor TFLOP/s (None: no FP8 units), ``mem`` memory bandwidth TB/s. None
    where the vendor publishes no figure."""

    name: str
    half: float | None
    fp32: float | None
    fp8: float | None
    mem: float


PEAKS: list[tuple[str, Peak]] = [
    # NVIDIA H100 Tensor Core GPU datasheet: BF16/FP16 1,979 (SXM) / 1,513 (PCIe) / 1,671 (NVL) TFLOPS with
    # sparsity, FP8 twice that; FP32 67 / 51 / 60; HBM 3.35 / 2.0 / 3.9 TB/s.
    (r"H100.*NVL", Peak("H100 NVL", 835.5, 60.0, 1670.5, 3.9)),
    (r"H100.*PCIe", Peak("H100 PCIe", 756.5, 51.0, 1513.0, 2.0)),
    (r"H100", Peak("H100 SXM", 989.5, 67.0, 1979.0, 3.35)),
    # NVIDIA H200 Tensor Core GPU datasheet: the H100's compute (SXM; NVL as H100 NVL), HBM3e 4.8 TB/s.
    (r"H200.*NVL", Peak("H200 NVL", 835.5, 60.0, 1670.5, 4.8)),
    (r"H200", Peak("H200 SXM", 989.5, 67.0, 1979.0, 4.8)),
    # NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 312 TFLOPS dense, FP32 19.5, no FP8; HBM2e 2,039 GB/s (80GB
    # SXM), 1,935 GB/s (80GB PCIe), 1,555 GB/s (40GB).
    (r"A100.*80GB.*PCIe", Peak("A100 80GB PCIe", 312.0, 19.5, None, 1.935)),
    (r"A100.*80GB", Peak("A100 80GB SXM", 312.0, 19.5, None, 2.039)),
    (r"A100", Peak("A100 40GB", 312.0, 19.5, None, 1.555)),
    # NVIDIA L40S datasheet: BF16/FP16 362.05 TFLOPS dense (733 with sparsity), FP8 733, FP32 91.6; 864 GB/s.
    (r"L40S", Peak("L40S", 362.05, 91.6, 733.0, 0.864)),
    # NVIDIA Ada Lovelace architecture whitepaper, RTX 4090: FP16/BF16 tensor with FP32 accumulate 165.2 TFLOPS
    # dense, FP8 (FP32 accumulate) 330.3, FP32 82.6; GDDR6X 1,008 GB/s.
    (r"RTX 4090", Peak("RTX 4090", 165.2, 82.6, 330.3, 1.008)),
    # Apple's product pages and press releases: GPU FP32 TFLOPS of the largest GPU configuration (M1 2.6, Pro 5.2,
    # Max 10.4, Ultra 21; M2 3.6, Pro 6.8, Max 13.6, Ultra 27.2; binned parts have fewer GPU cores) and unified
    # memory bandwidth. Apple's GPUs run fp16/bf16 at the fp32 rate. Apple publishes no FLOP figure for M3 and M4:
    # only their bandwidth is known (M3 100, Pro 150, Max 400, Ultra 819 GB/s; M4 120, Pro 273, Max 546 GB/s).
    (r"M1 Ultra", Peak("Apple M1 Ultra", 21.0, 21.0, None, 0.8)),
    (r"M1 Max", Peak("Apple M1 Max", 10.4, 10.4, None, 0.4)),
    (r"M1 Pro", Peak("Apple M1 Pro", 5.2, 5.2, None, 0.2)),
    (r"M1\b", Peak("Apple M1", 2.6, 2.6, None, 0.06825)),
    (r"M2 Ultra", Peak("Apple M2 Ultra", 27.2, 27.2, None, 0.8)),
    (r"M2 Max", Peak("Apple M2 Max", 13.6, 13.6, None, 0.4)),
    (r"M2 Pro", Peak("Apple M2 Pro", 6.8, 6.8, None, 0.2)),
    (r"M2\b", Peak("Apple M2", 3.6, 3.6, None, 0.1)),
    (r"M3 Ultra", Peak("Apple M3 Ultra", None, None, None, 0.819)),
    (r"M3 Max", Peak("Apple M3 Max", None, None, None, 0.4)),
    (r"M3 Pro", Peak("Apple M3 Pro", None, None, None, 0.15)),
    (r"M3\b", Peak("Apple M3", None, None, None, 0.1)),
    (r"M4 Max", Peak("Apple M4 Max", None, None, None, 0.546)),
    (r"M4 Pro", Peak("Apple M4 Pro", None, None, None, 0.273)),
    (r"M4\b", Peak("Apple M4", None, None, None, 0.12)),
]


def find_peak(name: str) -> Peak | None:
    """The `PEAKS` entry of a device name (``torch.cuda.get_device_name()``, ``mx.device_info()['device_name']``),
    or None (a CPU, named ``CPU ...`` by `device_name`, or an unlisted GPU)."""
    if name.startswith("CPU"):
        return None
    for pattern, peak in PEAKS:
        if re.search(pattern, name, re.IGNORECASE):
            return peak
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _apple_chip() -> str:
    import subprocess

    try:
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "Apple"
    except (OSError, subprocess.SubprocessError):
        return "Apple"


def device_name(device: str) -> str:
    """A readable name of ``device``: the GPU's name (``torch.cuda.get_device_name``, MLX's ``device_info``), the
    Apple chip for ``mps``, ``CPU <model>`` for a CPU (MLX on a machine without Metal included)."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    if device == "mps":
        return _apple_chip()
    if device == "mlx":
        import mlx.core as mx

        if mx.metal.is_available():
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            return str(info.get("device_name", "Apple GPU"))
    return f"CPU {_cpu_name()}"
