"""Child process that compiles one op library: `python -m zerocore.ops.compile_worker < request.json`.

The request names the spec (as a dict), the build directory and where to write the resulting marker; the
parent (builder._compile) waits for it. See builder._compile for why builds run in a child.
"""
import json
import sys
from pathlib import Path


def main() -> int:
    request = json.load(sys.stdin)
    from zerocore.ops.builder import compile_in_process
    from zerocore.ops.specs import OpSpec
    from zerocore.ops.toolchain import OpBuildError

    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in request["spec"].items()}
    try:
        marker = compile_in_process(OpSpec(**fields), Path(request["build_dir"]), request["verbose"])
    except OpBuildError as e:
        print(e, file=sys.stderr)
        return 1
    Path(request["result"]).write_text(json.dumps(marker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
