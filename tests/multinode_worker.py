"""One rank of a "multi-node" job: tests/test_multinode.py starts two torchrun agents on this machine as two
nodes (--nnodes 2, c10d rendezvous over loopback), each with --nproc_per_node 2.

    python multinode_worker.py STAGE SHARD_GROUP_SIZE OUT_DIR     (0: no shard groups)

Every rank trains the MLP of tests/zero_scenarios.py on its slice of the same global batches, compares with
single-process AdamW on the whole batch, and writes its result (rank, node, rel err, steps) to OUT_DIR/rank<R>.json.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zero_scenarios as Z  # noqa: E402


def main() -> None:
    stage, k, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")                       # env:// from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    data = Z.batches("mlp", world, 6)
    model, opt = Z.train_zero("mlp", data, rank, stage=stage, bucket_size=200,
                              **({"shard_group_size": k} if k else {}))
    if stage == 3:
        with opt.gathered():
            err = Z.rel_err(model, Z.train_reference("mlp", data))
    else:
        err = Z.rel_err(model, Z.train_reference("mlp", data))
    result = {"rank": rank, "world": world, "node": int(os.environ["GROUP_RANK"]),
              "local_rank": int(os.environ["LOCAL_RANK"]), "rel_err": err, "steps": opt.global_steps,
              "shard_size": opt.comm.shard_size}
    opt.close()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
