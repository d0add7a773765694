"""The training log and opt.stats() on 2 gloo ranks (tests/test_zero_stats.py)."""
from __future__ import annotations

import logging

import torch

import zero_scenarios as Z
from zerocore.zero import ZeroOptimizer
from zerocore.zero.stats import TrainingStats


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _run(stage, rank, world, **options):
    handler = _Capture()
    log = logging.getLogger("zerocore")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    records, norms = [], {}
    real = TrainingStats.record

    def keep(*a, **k):                        # the figures behind each line, to check the line against
        out = real(*a, **k)
        records.append(out)
        return out
    TrainingStats.record = staticmethod(keep)
    try:
        model = Z.mlp()
        opt = ZeroOptimizer(model, stage=stage, bucket_size=200, log_interval=2, comm_timeout_s=60, **options)
        data = Z.batches("mlp", world, 5, micro=2)
        for row in data:
            for x, y in row:
                opt.backward(Z.loss_of("mlp", model(Z.local(x, rank)), Z.local(y, rank)))
            with torch.no_grad():
                model(Z.local(row[0][0], rank))   # an evaluation forward: not a training sample
            opt.step()
            opt.zero_grad()
            norms[opt.global_steps] = opt.global_grad_norm
        local = opt.stats()
        opt.close()
    finally:
        TrainingStats.record = staticmethod(real)
        log.removeHandler(handler)
    return {"lines": handler.lines, "records": [{k: v for k, v in r.items() if k != "per_rank"} | {
        "ranks": len(r["per_rank"]), "samples": sum(p["samples"] for p in r["per_rank"]),
        "rss": [p["host_rss"] for p in r["per_rank"]]} for r in records],
            "norms": norms, "local": {k: v for k, v in local.items() if isinstance(v, (int, float))}}


def log_s2(rank, world):
    return _run(2, rank, world, gradient_accumulation_steps=2)


def log_s3(rank, world):
    return _run(3, rank, world, gradient_accumulation_steps=2, param_persistence_threshold=16)


SCENARIOS = ["log_s2", "log_s3"]
