"""Where the pinned toolchain binaries are (built by tools/toolchain/build.sh)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[4]
BUILD_SCRIPT = REPO_ROOT / "tools" / "toolchain" / "build.sh"


@functools.cache
def bin_dir() -> Path:
    """The toolchain's bin directory, building anything missing first (a no-op once built).

    EMPORIUM_TOOLCHAIN_BIN short-circuits the build script (``make test`` exports it after ``make tools``).
    """
    preset = os.environ.get("EMPORIUM_TOOLCHAIN_BIN")
    if preset:
        return Path(preset)
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(result.stdout.strip().splitlines()[-1])


def tool(name: str) -> str:
    path = bin_dir() / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not in {bin_dir()}: run `make tools`")
    return str(path)
