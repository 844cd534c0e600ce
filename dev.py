#!/usr/bin/env python3
"""Set up the environment on a fresh machine (only python3 needed) and run a job in it.

  python3 dev.py demo [ARGS]    the main job (`cleancompact demo`)
  python3 dev.py test [ARGS]    the test suite (pytest)
  python3 dev.py run  ARGS      any `cleancompact` command
  python3 dev.py setup [--gpu]  only create/update the environment

The virtual environment lives in .venv (override with CC_VENV). It is (re)installed when
pyproject.toml or constraints.txt change; otherwise set-up costs nothing.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("CC_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
# glibc's default allocator costs ~1.5x in training (docs/STACK.md); harmless elsewhere.
# Where this project's checkouts keep the datasets (CI, tests, demo) when CC_DATA_DIR is unset.
SHARED_DATA = ROOT.parent / "shared" / "data"
FAST_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184",
               "MALLOC_TOP_PAD_": "536870912"}


def ensure_env(gpu: bool = False) -> None:
    extras = "gpu,dev" if gpu else "cpu,dev"
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    digest.update(extras.encode())
    stamp = VENV / ".cleancompact-installed"
    if stamp.exists() and stamp.read_text() == digest.hexdigest():
        return
    if not (BIN / "python").exists():
        print(f"[dev] creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print(f"[dev] installing cleancompact[{extras}] (first run: about 1-2 minutes)", flush=True)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", "-c", str(ROOT / "constraints.txt"),
                    "-e", f"{ROOT}[{extras}]"], check=True)
    stamp.write_text(digest.hexdigest())


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "run", "setup"):
        print(__doc__.strip())
        return 2
    command, rest = argv[0], argv[1:]
    gpu = "--gpu" in rest and command == "setup"
    ensure_env(gpu=gpu)
    if command == "setup":
        return 0
    env = os.environ | FAST_MALLOC
    if "CC_DATA_DIR" not in env and SHARED_DATA.is_dir():
        env["CC_DATA_DIR"] = str(SHARED_DATA)
    if command == "test":
        cmd = [str(BIN / "python"), "-m", "pytest", *rest]
    elif command == "demo":
        cmd = [str(BIN / "cleancompact"), "demo", *rest]
    else:
        cmd = [str(BIN / "cleancompact"), *rest]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
