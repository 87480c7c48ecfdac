"""User-facing errors.

Anything a user can cause (a bad path, a bad option, a malformed file) raises ``SelftuneError``
with a one-line message that names the problem and, where there is one, the fix. The CLI prints
it without a traceback (``--debug`` shows the traceback) and exits with status 2.
"""


class SelftuneError(Exception):
    """A problem the user can fix; its message is shown as is."""
