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


@pytest.mark.slow
def test_warm_run_starts_where_the_first_did(tmp_path):
    """--warm times a second run from the same adapter and seed: it repeats the first run's losses exactly."""
    from lorapipe import bench

    (cold,) = bench.train_bench(["tiny"], ["speed"], 3, tmp_path / "cold")
    (warm,) = bench.train_bench(["tiny"], ["speed"], 3, tmp_path / "warm", warm=True)
    assert warm["warm"] is True and warm["run_s"] > 0 and warm["run_tokens_per_s"] > 0
    assert len(warm["step_s"]) == 3 and warm["losses"] == pytest.approx(cold["losses"], rel=1e-5)
