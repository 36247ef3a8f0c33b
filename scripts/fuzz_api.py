"""A longer API fuzzing run than CI's: tests/test_api_fuzz.py with more examples per operation and a seed of
your choice (a new seed explores new inputs; the same seed replays them), the alias paths included.

    python scripts/fuzz_api.py --examples 1000 --seed 7 [-k chat] [pytest options...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000, help="examples per operation (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default 0)")
    parser.add_argument("-k", dest="select", default=None, help="only the operations matching this pytest -k")
    args, pytest_args = parser.parse_known_args()
    env = {**os.environ, "EMBER_FUZZ_EXAMPLES": str(args.examples), "EMBER_FUZZ_SEED": str(args.seed),
           "EMBER_FUZZ_ALIASES": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_api_fuzz.py"), "-p",
               "no:cacheprovider", *(["-k", args.select] if args.select else []), *pytest_args]
    return subprocess.call(command, env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
