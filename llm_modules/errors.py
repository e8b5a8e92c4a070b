"""The one exception type for mistakes a user can fix (bad config, bad data, bad paths).

The CLI prints its message and exits with status 2, without a traceback; everything else is a bug.
"""


class UserError(Exception):
    """A problem in the user's input, with a message that names the value and the fix."""


def collect(problems: list[str], where: str) -> None:
    """Raise one UserError listing every problem found in `where` (config section, file ...)."""
    if problems:
        raise UserError(f"{where}:\n  - " + "\n  - ".join(problems))
