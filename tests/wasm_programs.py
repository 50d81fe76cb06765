"""Real C programs compiled to wasm32-wasi with zig's C compiler (PyPI `ziglang`).

The first build compiles wasi-libc into the zig cache (about 20-45 s); `<repo>/.cache/zig`
keeps it across runs (CI caches that directory). Later builds take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROGRAMS_DIR = Path(__file__).resolve().parent / "programs"
ZIG_CACHE_DIR = REPO / ".cache" / "zig"
#: the C programs tests may ask for, by name (`tests/programs/<name>.c`)
PROGRAMS = ("upper", "wordcount", "alloc")
BUILD_TIMEOUT_S = 600


def compiler_available() -> tuple[bool, str]:
    """(True, "") if `python -m ziglang` can run, else (False, why not)."""
    if importlib.util.find_spec("ziglang") is None:
        return False, "the ziglang package is not installed (pip install ziglang)"
    return True, ""


def build_c_program(name: str, source: Path, out_dir: Path) -> Path:
    """Compile `source` to `<out_dir>/<name>.wasm` (a WASI command module) and return it.

    Raises:
        subprocess.CalledProcessError: the compiler failed (its stderr is in the exception).
    """
    out = out_dir / f"{name}.wasm"
    env = {
        **os.environ,
        "ZIG_GLOBAL_CACHE_DIR": str(ZIG_CACHE_DIR),
        "ZIG_LOCAL_CACHE_DIR": str(ZIG_CACHE_DIR),
    }
    argv = [sys.executable, "-m", "ziglang", "cc", "-target", "wasm32-wasi", "-O2", "-s"]
    subprocess.run(
        [*argv, str(source), "-o", str(out)],
        env=env,
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT_S,
    )
    return out
