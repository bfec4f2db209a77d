"""Copy the generated result tables into the README, between their markers:

    <!-- table: bench/results/NAME.md -->
    … (replaced) …
    <!-- end table -->

    .venv/bin/python bench/update_readme.py
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- table: (?P<src>[^ ]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()

    missing = []

    def fill(m: re.Match) -> str:
        src = ROOT / m.group("src")
        if not src.exists():  # not generated yet: say so in place rather than fail
            missing.append(m.group("src"))
            return m.group(1) + f"(not generated yet: run `make bench-quick`)\n" + m.group(4)
        return m.group(1) + src.read_text().strip() + "\n" + m.group(4)

    new, n = BLOCK.subn(fill, text)
    readme.write_text(new)
    print(f"{n} table(s) refreshed" + (f"; missing: {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
