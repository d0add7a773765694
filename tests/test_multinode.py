"""The same script under a two-node torchrun (README, "Several machines"): two agents on this machine, each a
"node" of 2 ranks, meeting through the c10d rendezvous on loopback; training equals single-process AdamW, with
and without shard groups of one node (shard_group_size=2: sharded within a node, replicated across)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

import zero_scenarios as Z

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multinode_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage,k", [(2, 0), (3, 2)], ids=["stage2", "stage3-shard-per-node"])
def test_two_nodes_of_two_ranks_train_like_one_process(tmp_path, stage, k):
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    endpoint = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    nodes = [subprocess.Popen(launcher + ["--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(n),
                                          "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                                          "--rdzv_id", f"zc-test-{endpoint}", WORKER, str(stage), str(k),
                                          str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
             for n in range(2)]
    outputs = []
    try:
        for p in nodes:
            outputs.append(p.communicate(timeout=180)[0])
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, out in zip(nodes, outputs):
        assert p.returncode == 0, out[-4000:]
    results = sorted((json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)),
                     key=lambda r: r["rank"])
    assert [(r["rank"], r["world"]) for r in results] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert sorted({r["node"] for r in results}) == [0, 1]                # ranks on both "nodes"
    assert all(r["steps"] == 6 and r["rel_err"] <= Z.FP32_TOL for r in results), results
    assert all(r["shard_size"] == (k or 4) for r in results), results
    if k:                       # shard groups are the ranks of one node: consecutive ranks, same node
        assert all(r["node"] == results[r["rank"] - r["rank"] % k]["node"] for r in results), results
