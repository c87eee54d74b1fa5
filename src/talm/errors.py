"""The one exception type for problems a user can cause and fix.

Every message names the problem and the fix. The command-line tools print it as a single line and exit with
status 2; library callers catch it like any exception. Bugs are never wrapped in it.
"""


class TalmError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""
