"""Writing a benchmark's section into the measurement log, ``benchmarks/log/``.

``benchmarks/RESULTS.md`` is a hand-written summary of the latest figures that links to the log;
the scripts write only into the log, so a re-run never breaks the summary."""

from __future__ import annotations

import datetime
from pathlib import Path

LOG = Path(__file__).resolve().parent / "log"


def write_section(name: str, body: str) -> None:
    """Put ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in the log file that
    holds these markers, replacing what a previous run wrote there, so a re-run updates its table
    and the prose around it stays. A section no log file holds yet goes to ``log/<name>.md``: a new
    file, listed in ``log/README.md``, or appended to that file if it exists."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body.strip()}\n{end}"
    holders = [path for path in sorted(LOG.glob("*.md"))
               if path.name != "README.md" and start in path.read_text()]
    if len(holders) > 1:
        raise ValueError(f"section {name!r} is marked in {len(holders)} log files "
                         f"({', '.join(p.name for p in holders)}); it must be in one")
    if holders:
        text = holders[0].read_text()
        holders[0].write_text(text[:text.index(start)] + section + text[text.index(end) + len(end):])
        return
    path = LOG / f"{name}.md"
    if path.exists():  # a log file of that name without the markers: add to it, keep what it says
        path.write_text(path.read_text().rstrip("\n") + "\n\n" + section + "\n")
        return
    path.write_text(section + "\n")
    index = LOG / "README.md"
    index.write_text(index.read_text().rstrip("\n") + f"\n| [{path.name}]({path.name}) | "
                     f"{datetime.date.today().isoformat()}: section `{name}`, written by a benchmark script. |\n")
