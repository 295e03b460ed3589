"""Run under torchrun (gloo, CPU) by tests/test_distributed.py: the CUDA-graphs trainer class, with and without its
sync-free step, in every process; rank 0 writes what both logged to argv[2] as JSON."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch.distributed as dist  # noqa: E402
from test_speed import _graphs_trainer_run  # noqa: E402

model, out = sys.argv[1], Path(sys.argv[2])
result = {}
for fast in (True, False):
    logged, seen, real = _graphs_trainer_run(model, out.parent / f"run-{fast}", async_host=fast)
    result["async" if fast else "trl"] = {"logged": logged, "seen": seen, "real": real}
if dist.get_rank() == 0:
    out.write_text(json.dumps(result))
