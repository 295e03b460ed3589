"""python tools/export_bench/measure.py LABEL -- CMD...: one JSON line with CMD's wall time, its peak RSS (ru_maxrss,
which counts the touched pages of mapped files such as safetensors) and the peak of its own memory (RssAnon, read
from /proc every 0.05 s)."""
import json
import resource
import subprocess
import sys
import threading
import time

label, cmd = sys.argv[1], sys.argv[3:]
t0 = time.perf_counter()
proc = subprocess.Popen(cmd)
peak = [0]


def poll() -> None:
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
            peak[0] = max(peak[0], kb)
        except (OSError, StopIteration):
            pass
        time.sleep(0.05)


watcher = threading.Thread(target=poll, daemon=True)
watcher.start()
rc = proc.wait()
wall = time.perf_counter() - t0
watcher.join()
print("MEAS " + json.dumps({"label": label, "rc": rc, "wall_s": round(wall, 1),
                            "max_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, 2),
                            "peak_anon_gb": round(peak[0] / 1e6, 2)}), flush=True)
