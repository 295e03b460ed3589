"""Hold a GPU's memory so that only TARGET_GIB stays free, until killed: a smaller GPU, or one shared with another
job, for checking what lorapipe does when a run does not fit (BENCHMARKS.md, "Training that does not fit the GPU").

    python tools/hold_gpu_memory.py 4 &   # then lorapipe train ...; kill %1
"""

import sys
import time

import torch

target = float(sys.argv[1]) * 2**30
free, _ = torch.cuda.mem_get_info()
held = torch.empty(int(free - target), dtype=torch.uint8, device="cuda")
print(f"hog: holding {held.numel() / 2**30:.1f} GiB, free now {torch.cuda.mem_get_info()[0] / 2**30:.2f} GiB",
      flush=True)
time.sleep(7 * 24 * 3600)
