"""Apple Silicon chips: peak dense bf16 FLOP/s by chip and GPU core count, and chip detection.

    name, cores = detect_apple_chip()          # ("Apple M4 Max", 40) on a Mac, else (None, None)
    apple_peak_flops(name, cores)              # 1.6e13 or so; None for a chip not in the table
    apple_device_name(name, cores)             # 'Apple M4 Max (40-core GPU)'
"""
import re
import subprocess

# --- Apple Silicon ---------------------------------------------------------------------------
# Each Apple GPU core has 128 FP32 ALUs, each doing one fused multiply-add (2 FLOP) per clock.
# Apple GPUs run fp16/bf16 arithmetic at the same rate as fp32 (no faster matrix units before
# M5), so the fp32 rate is the bf16 peak up to M4. M1 and M2 have no native bf16 and emulate it, so a
# bf16 run there reaches a lower fraction of this peak; MFU is still against the ALU peak.
APPLE_ALUS_PER_CORE = 128
APPLE_FLOP_PER_ALU_PER_CLOCK = 2

# Highest GPU clock per family in Hz. M1 and M2 match Apple's published TFLOPS (M1 8-core
# 2.6 TFLOPS, M1 Max 32-core 10.4, M2 10-core 3.6, M2 Max 38-core 13.6). Apple published no
# TFLOPS for M3/M4; their clocks are the maximum GPU frequency reported by `powermetrics` in
# public measurements and may be off by up to ~10%.
APPLE_GPU_CLOCK_HZ = {
    "M1": 1.278e9,
    "M2": 1.398e9,
    "M3": 1.398e9,
    "M4": 1.578e9,
    "M5": 1.578e9,   # not published; taken as M4's
}
# M5 puts a Neural Accelerator (matrix unit) in every GPU core; Apple states "over 4x the peak GPU
# compute for AI" of M4 at every tier, so the M5 bf16 peak is 4x its ALU rate (an estimate).
APPLE_MATMUL_FACTOR = {"M5": 4.0}

# Chip -> GPU core counts Apple shipped (binned and full configurations).
APPLE_GPU_CORES = {
    "M1": (7, 8),
    "M1 Pro": (14, 16),
    "M1 Max": (24, 32),
    "M1 Ultra": (48, 64),
    "M2": (8, 10),
    "M2 Pro": (16, 19),
    "M2 Max": (30, 38),
    "M2 Ultra": (60, 76),
    "M3": (8, 10),
    "M3 Pro": (14, 18),
    "M3 Max": (30, 40),
    "M3 Ultra": (60, 80),
    "M4": (8, 10),
    "M4 Pro": (16, 20),
    "M4 Max": (32, 40),
    # Apple lists 10 cores for M5, "up to" 20 and 40 for M5 Pro and Max; the binned counts follow M4's.
    "M5": (8, 10),
    "M5 Pro": (16, 20),
    "M5 Max": (32, 40),
}


def _apple_peak(chip: str, cores: int) -> float:
    family = chip.split()[0]
    alu = cores * APPLE_ALUS_PER_CORE * APPLE_FLOP_PER_ALU_PER_CLOCK * APPLE_GPU_CLOCK_HZ[family]
    return alu * APPLE_MATMUL_FACTOR.get(family, 1.0)


# (chip, GPU cores) -> peak FLOP/s, e.g. ("M4 Max", 40) -> 1.62e13
APPLE_PEAK_FLOPS = {
    (chip, cores): _apple_peak(chip, cores) for chip, counts in APPLE_GPU_CORES.items() for cores in counts
}

_APPLE_CHIP_RE = re.compile(r"\bM(\d+)(?:\s+(Pro|Max|Ultra))?\b", re.IGNORECASE)
_CORES_RE = re.compile(r"(\d+)[- ]core GPU", re.IGNORECASE)


def parse_apple_chip(name: str) -> str | None:
    """'Apple M4 Max (40-core GPU)' -> 'M4 Max'; None when the name holds no Apple M chip."""
    m = _APPLE_CHIP_RE.search(name or "")
    if not m:
        return None
    return f"M{m.group(1)}" + (f" {m.group(2).capitalize()}" if m.group(2) else "")


def apple_peak_flops(name: str, gpu_cores: int | None = None) -> float | None:
    """Peak FLOP/s of an Apple chip by name and GPU core count (read from the name if absent)."""
    chip = parse_apple_chip(name)
    if chip is None:
        return None
    if gpu_cores is None:
        m = _CORES_RE.search(name)
        gpu_cores = int(m.group(1)) if m else None
    if gpu_cores is None:
        return None  # every chip ships in two core counts; guessing would misstate MFU
    return APPLE_PEAK_FLOPS.get((chip, int(gpu_cores)))


def apple_device_name(chip_name: str, gpu_cores: int | None) -> str:
    """The device string of the summary block: 'Apple M4 Max (40-core GPU)'."""
    return f"{chip_name} ({gpu_cores}-core GPU)" if gpu_cores else chip_name


def detect_apple_chip(run=subprocess.run) -> tuple[str | None, int | None]:
    """(chip name as macOS reports it, GPU core count) or (None, None) off Apple Silicon.

    `run` has subprocess.run's signature; tests pass a fake that returns canned outputs.
    """
    brand = run_text(run, ["sysctl", "-n", "machdep.cpu.brand_string"])
    if not brand or parse_apple_chip(brand) is None or "apple" not in brand.lower():
        return None, None
    name = brand.strip()
    # ioreg answers in milliseconds; system_profiler is slow (~1 s) and only the fallback.
    text = run_text(run, ["ioreg", "-rc", "AGXAccelerator", "-d", "1"]) or ""
    m = re.search(r'"gpu-core-count"\s*=\s*(\d+)', text)
    if not m:
        text = run_text(run, ["system_profiler", "SPDisplaysDataType"]) or ""
        m = re.search(r"Total Number of Cores:\s*(\d+)", text)
    return name, (int(m.group(1)) if m else None)


def run_text(run, cmd) -> str | None:
    """stdout of `cmd` run through `run` (subprocess.run's signature), or None if it fails."""
    try:
        proc = run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None
