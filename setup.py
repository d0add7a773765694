"""Installs zerocore. Op libraries compile on first use (JIT); `ZEROCORE_BUILD_OPS=1 pip install
--no-build-isolation .` prebuilds every op this machine can build, against the torch already installed."""
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _prebuild(package_dir: Path) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("ZEROCORE_BUILD_OPS=1 needs torch in the build environment: install torch first, then run "
                 "`ZEROCORE_BUILD_OPS=1 pip install --no-build-isolation .`")
    sys.path.insert(0, str(HERE))
    from zerocore.ops.builder import prebuild_all

    results = prebuild_all(package_dir / "_prebuilt")
    for name, result in results.items():
        print(f"zerocore: op {name}: {result}")


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (JIT builds need it at run time) and prebuilds ops when asked."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "zerocore"
        if self.editable_mode:
            target = HERE / "zerocore"  # the checkout's own csrc/ is found there; prebuilt goes beside it
        else:
            shutil.copytree(HERE / "csrc", target / "_csrc", dirs_exist_ok=True)
        if os.environ.get("ZEROCORE_BUILD_OPS") == "1":
            _prebuild(target)


setup(
    name="zerocore",
    version="0.1.0",
    description="ZeRO (Zero Redundancy Optimizer) stages 1 and 2 for PyTorch, with optimizer offload to CPU memory",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["zerocore", "zerocore.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "ninja", "pybind11", "safetensors>=0.4", "tqdm"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "transformers", "accelerate"],
                    "hf": ["transformers", "accelerate"]},
    cmdclass={"build_py": BuildPyWithSources},
    entry_points={"console_scripts": ["zerocore=zerocore.__main__:main"]},
)
