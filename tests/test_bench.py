"""`lorapipe bench train --tiny` on CPU: both paths run on the same data and agree on the first step's loss."""

import pytest


@pytest.mark.slow
def test_tutorial_and_speed_paths_agree_on_first_step_loss(tmp_path):
    from lorapipe import bench

    rows = bench.train_bench(["tiny"], ["tutorial", "speed"], 2, tmp_path)
    tut, fast = rows
    assert tut["setting"] == "tutorial" and fast["setting"] == "speed"
    assert len(tut["losses"]) == len(fast["losses"]) == 2
    assert abs(tut["losses"][0] - fast["losses"][0]) / tut["losses"][0] < 0.01
    assert tut["tokens_per_s"] > 0 and fast["speedup"] > 0
