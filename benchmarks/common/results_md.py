"""``benchmarks/RESULTS.md``: each benchmark owns one ``## ...`` section and replaces only that one.

Several benchmarks (and people) update the file, so it is re-read right before the write and
everything outside the section is kept byte for byte.
"""

from __future__ import annotations

import re
from pathlib import Path

TITLE = "# ckptstore benchmark results\n\n"


def replace_section(path: Path, heading: str, section: str, preamble: str = "") -> None:
    """Replace the section that starts with the line ``heading`` by ``section``, or append it.

    Args:
        path: the Markdown file; created if missing, as ``TITLE + preamble + section``.
        heading: the section's first line, e.g. ``"## Load: full and partial"``.
        section: the new section, starting with ``heading``.
        preamble: text between the title and the section of a new file.
    """
    if not path.exists():
        path.write_text((TITLE + preamble + section).rstrip("\n") + "\n")
        return
    text = path.read_text()
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
