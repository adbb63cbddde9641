"""Write ``constraints.txt``: every package the project installs, pinned to what one resolution
picks today. ``make``, CI and the Docker image install with ``-c constraints.txt``, so a fresh
machine gets what the tests last passed with; ``make lock`` (this script) is the way to upgrade
on purpose, followed by ``make test``.

One resolution covers the serving, training, test and CUDA dependencies together (pip's
``--dry-run --report``: no package is installed, and the large CUDA wheels are not downloaded).
torch stays the CPU build (``torch==2.13.0``; see the header).

    .venv/bin/python deploy/lock.py            # rewrites constraints.txt
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"
HEADER = f"""\
# Every package the project installs, pinned: make, CI (.ci/run) and the Dockerfile install with
# -c constraints.txt. Regenerate on purpose with `make lock` (deploy/lock.py), then `make test`.
# {TORCH} is the CPU build that pip installs from local disk; an unpinned torch would pull a
# multi-GB CUDA build.
"""


def normalized(name: str) -> str:
    """A distribution's name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve() -> dict[str, str]:
    """Package name -> version, as pip resolves the project with all its extras."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run",
                        "--ignore-installed", "--disable-pip-version-check",
                        "--report", str(report), TORCH, f"{ROOT}[train,dev,cuda,gpu-metrics]"],
                       check=True)
        installs = json.loads(report.read_text())["install"]
    pins = {}
    for item in installs:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if normalized(name) != "imgserve":
            pins[normalized(name)] = version.split("+")[0]  # 2.13.0+cpu: the pin matches both
    return pins


def main() -> int:
    pins = resolve()
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    (ROOT / "constraints.txt").write_text(HEADER + "\n".join(lines) + "\n")
    print(f"constraints.txt: {len(lines)} packages pinned")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
