"""``python -m medfed.report DIR``: rebuild a study's report from the files already in DIR."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from medfed.report import write_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medfed.report",
        description="Regenerate report.html and report.md from a `medfed study` output directory.",
    )
    parser.add_argument("study_dir", type=Path, help="directory written by `medfed study --out`")
    args = parser.parse_args(argv)
    try:
        html_path, md_path = write_report(args.study_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(html_path)
    print(md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
