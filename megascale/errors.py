"""User-facing errors: one line naming the problem and the fix."""


class MegascaleError(Exception):
    """An error caused by the user's input (config, data, checkpoint).

    Launchers print ``str(err)`` as a single line and exit with status 2, so the
    message must say what is wrong *and* how to fix it.
    """
