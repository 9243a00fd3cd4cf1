"""Peak FLOP/s tables (Apple in backends/mlx/chips, NVIDIA in backends/cuda/hardware), Apple chip
detection with fake command outputs, MFU, and the machine's memory."""
import subprocess
from types import SimpleNamespace

import pytest

from mlx_ar.backends.cuda.hardware import nvidia_peak_flops
from mlx_ar.backends.mlx.chips import (
    APPLE_GPU_CORES, APPLE_PEAK_FLOPS, apple_device_name, apple_peak_flops, detect_apple_chip, parse_apple_chip,
)
from mlx_ar.backends.mlx.memory import total_memory_bytes
from mlx_ar.harness.hardware import mfu_percent


# --- Apple table -----------------------------------------------------------------------------
def test_apple_table_covers_m1_to_m5_in_every_tier():
    for gen in ("M1", "M2", "M3", "M4", "M5"):
        for tier in ("", " Pro", " Max"):
            assert gen + tier in APPLE_GPU_CORES
    for chip in ("M1 Ultra", "M2 Ultra", "M3 Ultra"):
        assert chip in APPLE_GPU_CORES
    assert len(APPLE_PEAK_FLOPS) == sum(len(c) for c in APPLE_GPU_CORES.values())


@pytest.mark.parametrize("chip, cores, published_tflops", [
    ("M1", 8, 2.6), ("M1 Max", 32, 10.4), ("M2", 10, 3.6), ("M2 Max", 38, 13.6), ("M2 Ultra", 76, 27.2),
])
def test_apple_peaks_match_apples_published_fp32_figures(chip, cores, published_tflops):
    assert APPLE_PEAK_FLOPS[(chip, cores)] / 1e12 == pytest.approx(published_tflops, rel=0.02)


def test_apple_peak_scales_with_cores_within_a_family():
    for chip, counts in APPLE_GPU_CORES.items():
        lo, hi = (APPLE_PEAK_FLOPS[(chip, c)] for c in counts)
        assert hi / lo == pytest.approx(counts[1] / counts[0])
    assert APPLE_PEAK_FLOPS[("M4 Max", 40)] > APPLE_PEAK_FLOPS[("M3 Max", 40)]


def test_m5_has_a_peak_with_its_matrix_units():
    # MFU printed `unknown` on M5 Macs; Apple states over 4x M4's peak GPU compute for AI.
    assert apple_peak_flops("Apple M5", 10) == pytest.approx(4 * APPLE_PEAK_FLOPS[("M4", 10)])
    assert apple_peak_flops("Apple M5 Max (40-core GPU)") == pytest.approx(4 * APPLE_PEAK_FLOPS[("M4 Max", 40)])
    assert detect_apple_chip(run=fake_run({"sysctl": "Apple M5 Pro\n", "ioreg": '"gpu-core-count" = 20'})) == \
        ("Apple M5 Pro", 20)


def test_peak_flops_from_apple_names():
    peak_flops = apple_peak_flops
    assert peak_flops("Apple M4 Max", 40) == APPLE_PEAK_FLOPS[("M4 Max", 40)]
    assert peak_flops("Apple M4 Max (40-core GPU)") == APPLE_PEAK_FLOPS[("M4 Max", 40)]
    assert peak_flops(apple_device_name("Apple M1 Pro", 14)) == APPLE_PEAK_FLOPS[("M1 Pro", 14)]
    assert peak_flops("Apple M4 Max") is None          # core count unknown: two configurations exist
    assert peak_flops("Apple M4 Max", 41) is None      # not a shipped configuration
    assert peak_flops("Apple M9 Ultra", 100) is None   # future chip: unknown, not guessed


def test_parse_apple_chip_and_device_name():
    assert parse_apple_chip("Apple M2 Ultra") == "M2 Ultra"
    assert parse_apple_chip("Apple M3") == "M3"
    assert parse_apple_chip("apple m1 max (32-core GPU)") == "M1 Max"
    assert parse_apple_chip("Intel(R) Core(TM) i9-9980HK") is None
    assert apple_device_name("Apple M4 Max", 40) == "Apple M4 Max (40-core GPU)"
    assert apple_device_name("Apple M4 Max", None) == "Apple M4 Max"


# --- Apple detection with fake commands ------------------------------------------------------
def fake_run(outputs):
    """A subprocess.run stand-in: outputs maps the command's first word to stdout (None = fails)."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd[0])
        out = outputs.get(cmd[0])
        if isinstance(out, Exception):
            raise out
        return SimpleNamespace(returncode=0 if out is not None else 1, stdout=out or "", stderr="")

    run.calls = calls
    return run


IOREG = '''+-o AGXAcceleratorG16X  <class AGXAcceleratorG16X, id 0x1000003a2>
    {
      "gpu-core-count" = 40
      "model" = "Apple M4 Max"
    }
'''
SYSTEM_PROFILER = """Graphics/Displays:

    Apple M2 Pro:

      Chipset Model: Apple M2 Pro
      Type: GPU
      Bus: Built-In
      Total Number of Cores: 19
      Vendor: Apple (0x106b)
"""


def test_detect_apple_chip_via_ioreg():
    run = fake_run({"sysctl": "Apple M4 Max\n", "ioreg": IOREG})
    assert detect_apple_chip(run=run) == ("Apple M4 Max", 40)
    assert "system_profiler" not in run.calls  # the slow fallback is not needed


def test_detect_apple_chip_falls_back_to_system_profiler():
    run = fake_run({"sysctl": "Apple M2 Pro\n", "ioreg": None, "system_profiler": SYSTEM_PROFILER})
    assert detect_apple_chip(run=run) == ("Apple M2 Pro", 19)


def test_detect_apple_chip_core_count_unknown():
    run = fake_run({"sysctl": "Apple M3\n", "ioreg": "nothing useful", "system_profiler": None})
    assert detect_apple_chip(run=run) == ("Apple M3", None)


@pytest.mark.parametrize("outputs", [
    {"sysctl": "Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz\n"},     # Intel Mac
    {"sysctl": None},                                               # Linux: no such sysctl key
    {"sysctl": FileNotFoundError("sysctl")},                        # no sysctl binary at all
    {"sysctl": subprocess.TimeoutExpired("sysctl", 10)},
])
def test_detect_apple_chip_off_apple_silicon(outputs):
    assert detect_apple_chip(run=fake_run(outputs)) == (None, None)


# --- NVIDIA ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.5),
    ("NVIDIA H100 SXM5 80GB", 989.5),
    ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", 989.5),
    ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA L40S", 362.05),
    ("NVIDIA L40", 181.05),
    ("NVIDIA L4", 121),
    ("NVIDIA A10", 125),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", 71),
    ("NVIDIA GeForce RTX 3090 Ti", 80),
    ("NVIDIA RTX A6000", 154.8),
    ("NVIDIA RTX 6000 Ada Generation", 364.25),
    ("NVIDIA B200", 2250),
])
def test_nvidia_peaks(name, tflops):
    assert nvidia_peak_flops(name) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA A10G", "Tesla T4", "Tesla V100-SXM2-16GB", "cpu", "AMD EPYC", "", None])
def test_unknown_devices_have_no_peak(name):
    assert nvidia_peak_flops(name) is None and apple_peak_flops(name) is None


# --- MFU and memory --------------------------------------------------------------------------
def test_mfu_percent():
    assert mfu_percent(6e8, 1e6, 989.5e12) == pytest.approx(100 * 6e14 / 989.5e12)
    assert mfu_percent(6e8, 1e6, None) is None
    assert mfu_percent(6e8, 1e6, 0.0) is None


def test_total_memory_bytes_linux_and_macos():
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1 << 20}
    assert total_memory_bytes(platform="linux", sysconf=pages.__getitem__) == 4 * (1 << 30)
    run = fake_run({"sysctl": "68719476736\n"})
    assert total_memory_bytes(run=run, platform="darwin") == 64 * (1 << 30)
    assert total_memory_bytes(run=fake_run({"sysctl": None}), platform="darwin") is None
    assert total_memory_bytes() > 0  # this machine


# --- a Mac through the night -----------------------------------------------------------------
def test_keep_awake_ties_caffeinate_to_our_process_on_macos_only():
    from mlx_ar.backends.mlx.power import keep_awake

    started = []
    popen = lambda cmd, **kw: started.append(cmd) or "child"          # noqa: E731
    assert keep_awake(pid=4242, platform="darwin", which=lambda n: "/usr/bin/" + n, popen=popen) == "child"
    assert started == [["/usr/bin/caffeinate", "-i", "-w", "4242"]]   # idle sleep held until pid 4242 exits
    assert keep_awake(platform="linux", which=lambda n: "/usr/bin/" + n, popen=popen) is None
    assert keep_awake(platform="darwin", which=lambda n: None, popen=popen) is None
    assert len(started) == 1


@pytest.mark.parametrize("output, expected", [
    ("Now drawing from 'Battery Power'\n -InternalBattery-0 (id=1)\t83%; discharging; 4:01 remaining present: true\n",
     {"on_battery": True, "percent": 83}),
    ("Now drawing from 'AC Power'\n -InternalBattery-0 (id=1)\t100%; charged; 0:00 remaining present: true\n",
     {"on_battery": False, "percent": 100}),
    ("Now drawing from 'AC Power'\n", {"on_battery": False, "percent": None}),       # a Mac mini
    (None, None),
])
def test_battery_status_from_pmset(output, expected):
    from mlx_ar.backends.mlx.power import battery_status

    run = fake_run({"pmset": output})
    assert battery_status(platform="darwin", run=run) == expected
    assert battery_status(platform="linux", run=run) is None
