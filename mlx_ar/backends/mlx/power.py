"""A Mac through the night: no idle sleep while a campaign runs, and whether it runs on battery.

macOS puts an idle Mac to sleep even while a process computes, which cuts an overnight campaign
short. `keep_awake()` starts macOS's `caffeinate -i -w <pid>`: an idle-sleep assertion held until
the process `pid` exits, so it ends with us even when we are killed. `battery_status()` reads
`pmset -g batt` for `mlx-ar doctor` (a laptop on battery throttles, and dies at an empty one).

    proc = keep_awake()            # None off macOS or without caffeinate
    battery_status()               # {"on_battery": False, "percent": 100} on a MacBook on AC
"""
import os
import re
import shutil
import subprocess
import sys

from .chips import run_text


def keep_awake(pid: int | None = None, platform: str = sys.platform, which=shutil.which,
               popen=subprocess.Popen):
    """Start `caffeinate -i -w pid` (pid: this process by default) on macOS; return the child, or None
    where there is nothing to hold (not macOS, no caffeinate)."""
    if platform != "darwin":
        return None
    exe = which("caffeinate")
    if exe is None:
        return None
    try:
        return popen([exe, "-i", "-w", str(pid or os.getpid())], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None


_SOURCE_RE = re.compile(r"drawing from '([^']+)'")
_PERCENT_RE = re.compile(r"(\d+)%")


def battery_status(platform: str = sys.platform, run=subprocess.run) -> dict | None:
    """{"on_battery": bool, "percent": int | None} from `pmset -g batt` on macOS; None elsewhere or
    when it cannot be read. A Mac without a battery reports on_battery False and percent None."""
    if platform != "darwin":
        return None
    text = run_text(run, ["pmset", "-g", "batt"]) or ""
    source = _SOURCE_RE.search(text)
    if source is None:
        return None
    percent = _PERCENT_RE.search(text)
    return {"on_battery": source.group(1) == "Battery Power", "percent": int(percent.group(1)) if percent else None}
