"""Write README.md's operator table from the registry (graftc.passes), between its two marker lines.

    python scripts/operator_table.py           # rewrite the table in place
    python scripts/operator_table.py --check   # exit 1 if README's table is not what the registry renders

tests/test_operators.py runs the check, so a rule whose fields or text change without this being rerun fails.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- operator table: generated from graftc.passes by scripts/operator_table.py (edit the rules, not this) -->"
END = "<!-- end of operator table -->"


def rendered() -> str:
    from graftc.passes import rules_by_op
    from graftc.rules import operator_table

    return operator_table(rules_by_op().values())


def split(text: str) -> tuple[str, str, str]:
    """(before the table, the table, after it), the markers staying in before/after."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"{README}: expected one '{BEGIN}' line and one '{END}' line")
    head, rest = text.split(BEGIN + "\n")
    table, tail = rest.split(END)
    return head + BEGIN + "\n", table, END + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if README is out of date")
    args = parser.parse_args(argv)
    head, table, tail = split(README.read_text())
    fresh = rendered()
    if args.check:
        if table != fresh:
            print(f"{README}: the operator table is out of date; run python scripts/operator_table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(head + fresh + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
