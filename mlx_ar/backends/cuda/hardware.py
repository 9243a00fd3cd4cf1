"""NVIDIA devices: peak dense bf16 FLOP/s by device name, and the CPU's name for CPU runs.

    nvidia_peak_flops("NVIDIA H100 80GB HBM3")     # 989.5e12; None for a device not in the table
    cpu_model_name()                               # 'AMD EPYC 7B13' on Linux
"""
import platform
import re

# Dense bf16 tensor-core peaks (no 2:4 sparsity) from NVIDIA's datasheets. GeForce cards are
# listed at the fp32-accumulate rate, which is what training uses (half their fp16-acc rate).
# First match wins, so specific variants (H100 PCIe, L40S) come before their families.
NVIDIA_PEAK_FLOPS = (
    (r"\bGB200\b", 2.5e15),
    (r"\bB200\b", 2.25e15),
    (r"\bB100\b", 1.75e15),
    (r"\bGH200\b", 989.5e12),
    (r"\bH[18]00\b.*\bPCIE\b", 756e12),
    (r"\bH[12]00\b.*\bNVL\b", 835.5e12),
    (r"\bH[128]00\b", 989.5e12),  # SXM: "NVIDIA H100 80GB HBM3", "NVIDIA H200", H800
    (r"\bA[18]00\b", 312e12),
    (r"\bA40\b", 149.7e12),
    (r"\bA30\b", 165e12),
    (r"\bA10\b", 125e12),  # not A10G (AWS's variant has different clocks)
    (r"\bL40S\b", 362.05e12),
    (r"\bL40\b", 181.05e12),
    (r"\bL4\b", 121e12),
    (r"\bRTX 6000 ADA\b", 364.25e12),
    (r"\bRTX A6000\b", 154.8e12),
    (r"\bRTX 4090\b", 165.2e12),
    (r"\bRTX 3090 TI\b", 80e12),
    (r"\bRTX 3090\b", 71e12),
)


def nvidia_peak_flops(name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a CUDA device name such as torch.cuda.get_device_name()."""
    upper = " ".join((name or "").upper().replace("-", " ").split())
    for pattern, peak in NVIDIA_PEAK_FLOPS:
        if re.search(pattern, upper):
            return peak
    return None



def cpu_model_name(cpuinfo="/proc/cpuinfo") -> str:
    """'AMD EPYC 7B13' from /proc/cpuinfo on Linux, else what `platform` knows."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"
