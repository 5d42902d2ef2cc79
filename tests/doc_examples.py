"""The code examples of docs/integration.md, run by the tests so that the documentation cannot
drift from the code: each is the python block that follows an ``<!-- example: NAME -->`` line."""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "integration.md"


def example(name: str) -> dict:
    """Execute example ``name`` and return the names it defines."""
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    if match is None:
        raise LookupError(f"{DOC} has no example {name!r}")
    namespace: dict = {}
    exec(compile(match.group(1), f"{DOC}:{name}", "exec"), namespace)
    return namespace
