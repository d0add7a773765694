"""Training log every log_interval steps on rank 0, and opt.stats() (bodies: tests/zero_stats_scenarios.py)."""
import re

import pytest

import zero_scenarios as Z
import zero_stats_scenarios as T
from dist_helpers import check_all_ranks

LINE = re.compile(r"zerocore step (\d+) \| loss scale (\S+) \| grad norm (\S+) \| step (\d+) ms \(forward\+backward "
                  r"(\d+), reduction wait (\d+), step (\d+), gather wait (\d+)\) \| ([\d.]+) samples/s \| memory per "
                  r"rank \(GiB\): host rss ([\d.]+) ([\d.]+) \(peak ([\d.]+)\), device ([\d.]+) \(peak ([\d.]+)\), "
                  r"pinned ([\d.]+), nvme ([\d.]+)$")


@pytest.mark.parametrize("name", T.SCENARIOS)
def test_log_lines_at_the_interval_with_every_field(scenario_results, name):
    results = check_all_ranks(scenario_results("zero_stats_scenarios", 2, T.SCENARIOS), name)
    rank0, rank1 = results
    assert rank1["lines"] == [] and rank1["records"] == []           # rank 0 logs, the others only contribute
    assert [int(LINE.match(line).group(1)) for line in rank0["lines"]] == [2, 4], rank0["lines"]
    for line, rec in zip(rank0["lines"], rank0["records"]):
        m = LINE.match(line)
        step = int(m.group(1))
        assert float(m.group(3)) == pytest.approx(rank0["norms"][step], rel=1e-3)   # the step's real norm
        assert float(m.group(2)) == 1.0                                            # fp32: no loss scaling
        # two training micro-batches of LOCAL_BATCH per step and rank; the no_grad forward does not count
        assert rec["samples"] == 2 * 2 * 2 * Z.LOCAL_BATCH and rec["ranks"] == 2, rec
        parts = [rec[k] for k in ("forward_backward_s", "reduction_wait_s", "step_only_s", "gather_wait_s")]
        assert all(p >= 0 for p in parts) and sum(parts) == pytest.approx(rec["step_s"], rel=1e-6), rec
        assert rec["samples_per_s"] == pytest.approx(rec["samples"] / (2 * rec["step_s"]), rel=1e-6), rec
        assert all(r > 100 * 2**20 for r in rec["rss"]), rec                       # a live process's RSS
    local = rank1["local"]
    assert local["global_steps"] == 5 and local["grad_norm"] == pytest.approx(rank1["norms"][5])
    assert local["host_peak"] >= local["host_rss"] > 0 and local["step_s"] > 0
