"""Shared fixtures. Multi-rank tests share one spawned gloo group per (scenario module, world size)."""
import pytest

from dist_helpers import run_scenarios


@pytest.fixture(scope="session")
def scenario_results():
    """get(module, world_size, names) -> {name: [per-rank result]}, run once per session and key."""
    cache = {}

    def get(module, world_size, names):
        key = (module, world_size, tuple(names))
        if key not in cache:
            cache[key] = run_scenarios(world_size, module, names)
        return cache[key]
    return get


@pytest.fixture
def single_rank_group(tmp_path):
    """A one-rank gloo process group in the test process (for API and error tests), destroyed afterwards."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
