"""What the sandbox tests share: the interpreter both sandboxes show, and a tagged python3 command."""
from __future__ import annotations

import textwrap

PY = "/usr/bin/python3"  # Debian's interpreter; /usr is what both sandboxes show of the host

ECHO = """
import json, sys
for line in sys.stdin:
    item = json.loads(line)
    print(json.dumps(ITEM_EXPR), flush=True)
"""


def py(code: str, marker: str, expr: str = "item") -> list[str]:
    """A python3 command; `marker` rides in argv so leftovers are recognisable on the host."""
    return [PY, "-c", textwrap.dedent(code).replace("ITEM_EXPR", expr), marker]
