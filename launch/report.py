"""Write a one-page Markdown report of a run: config, loss/coherence plots, untie events, throughput, memory.

    python launch/report.py runs/tiny            # writes runs/tiny/report.md (+ loss.png, coherence.png)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the run's train.out_dir")
    args = p.parse_args(argv)
    from megascale.train.report import write_report

    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    common.setup_logging()
    common.exit_with(common.run(main, sys.argv[1:]))
