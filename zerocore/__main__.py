"""Command line: `python -m zerocore report` (environment and op table), `python -m zerocore build [OP ...]`
(compile op libraries into the cache now), `python -m zerocore consolidate CKPT OUT` (a checkpoint's full model
state dict as safetensors files), `python -m zerocore estimate` (per-rank memory of every ZeRO stage and offload
choice, from a number of parameters or a transformers config), `python -m zerocore demo` (a short multi-rank
training run). Each has --help."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zerocore")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("report", help="versions, compilers, SIMD level, I/O backend and every op's status")
    build = commands.add_parser("build", help="compile op libraries into the cache now")
    build.add_argument("ops", nargs="*", help="op names (default: every op compatible with this machine)")
    build.add_argument("--verbose", action="store_true", help="show the compiler's output")
    cons_help = ("write a checkpoint's full model state dict as safetensors (Hugging Face layout), one parameter at "
                 "a time")
    cons = commands.add_parser("consolidate", help=cons_help, description=cons_help[0].upper() + cons_help[1:] +
                               ": from_pretrained loads the folder; host memory stays about two copies of the "
                               "largest parameter.")
    cons.add_argument("ckpt", help="the folder given to save_checkpoint")
    cons.add_argument("out", help="output folder")
    cons.add_argument("--tag", help="checkpoint tag (default: the one in CKPT/latest)")
    cons.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    cons.add_argument("--max-shard-size", type=float, default=5e9, help="bytes per output file (default 5e9)")
    est = commands.add_parser(
        "estimate", help="per-rank device, host and NVMe memory of every ZeRO stage and offload choice",
        description="Print the per-rank memory (GiB) of ZeRO stages 1-3 (and plain data parallelism) with and "
        "without offload: by the ZeRO formula for --params, exactly as ZeroOptimizer lays it out for --model "
        "(built on the meta device: nothing is downloaded but the config, nothing allocated).")
    what = est.add_mutually_exclusive_group(required=True)
    what.add_argument("--params", type=float, help="number of trainable parameters, e.g. 7e9")
    what.add_argument("--model", help="a transformers config: path of a config.json (or its folder), or a hub "
                      "name (needs network); needs `pip install transformers`")
    est.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs)")
    est.add_argument("--stage", type=int, choices=(0, 1, 2, 3), help="one stage (0: no ZeRO); default: all")
    est.add_argument("--offload-optimizer", choices=("cpu", "nvme"), help="fp32 masters and Adam state there")
    est.add_argument("--offload-param", choices=("cpu", "nvme"), help="stage 3 parameter shards there")
    est.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="compute dtype "
                     "(bf16/fp16 keep fp32 masters; default fp32)")
    est.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where the model trains "
                     "(default cuda)")
    est.add_argument("--shard-group-size", type=int, help="shard within groups of this many ranks and replicate "
                     "across them (memory as for that many ranks)")
    est.add_argument("--largest-layer", type=float, help="with --params: elements of the largest layer "
                     "(stage 3's working set; default: prefetch_bucket_size)")
    demo = commands.add_parser(
        "demo", help="a short multi-rank ZeRO training run on this machine (torchrun; gloo, or NCCL on GPUs)",
        description="Launch `torchrun --nproc_per_node N -m zerocore.demo ARGS`: a small MLP trained with "
        "ZeroOptimizer; prints the loss, step time and the bytes each rank holds beside the ZeRO formula. "
        "Arguments after the options go to the demo (see `python -m zerocore.demo --help`).")
    demo.add_argument("--nproc", type=int, default=2, help="ranks (processes) to start (default 2)")
    args, rest = parser.parse_known_args(argv)

    if args.command == "demo":                 # the options it does not know are the demo's
        import subprocess
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--master_port", str(_free_port()), "-m", "zerocore.demo", *rest]
        return subprocess.call(cmd)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    if args.command == "estimate":
        from .estimate import main as estimate_main
        return estimate_main(args)

    if args.command == "consolidate":
        import torch
        from .zero.consolidate import consolidate
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        for path in consolidate(args.ckpt, out=args.out, dtype=dtype, tag=args.tag,
                                max_shard_bytes=int(args.max_shard_size)):
            print(path)
        return 0

    if args.command == "report":
        from .report import main as report_main
        return report_main()

    from . import ops
    names = args.ops or [n for n in ops.available() if ops.compatibility(n)[0]]
    failed = 0
    for name in names:
        try:
            print(f"{name}: built in {ops.build(name, verbose=args.verbose)}", flush=True)
        except ops.OpBuildError as e:
            print(f"{name}: FAILED: {e}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
