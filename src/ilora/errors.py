"""The one exception type for bad user input.

Library code raises ``IloraError`` with a message naming the file (or option) and the
problem; the CLI prints it as a single line and exits with status 2.
"""


class IloraError(ValueError):
    """Bad input: a wrong file, option or combination, explained in one line."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of another library's error message (they often span many lines), for an ``IloraError``."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]
