"""User-facing errors: one line saying what is wrong, where, and what is allowed."""


import json
import re
from pathlib import Path


class GraftError(Exception):
    """Bad input or an impossible request. The CLI prints it on one line and exits with code 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line for a GraftError: its type and the first line of its message (loaders'
    messages can run over many lines and carry terminal colour codes)."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    first = lines[0].strip() if lines else ""
    first = first if len(first) <= limit else first[: limit - 3] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def read_json(path: Path):
    """Parse a JSON file the user or an artifact gave us; a syntax error is a GraftError naming the file."""
    try:
        return json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # bytes: json detects UTF-8/16/32 itself
        raise GraftError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise GraftError(f"{path}: not valid JSON: nested too deeply") from None
