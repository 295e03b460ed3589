"""The one exception type users see: a bad input, explained. The CLI turns it into one line and exit code 2."""


class UserError(Exception):
    """A problem with the user's input (file, config, data, run directory) that they can fix.

    The message names the file (and line) and the field, and says what to do. No traceback is shown unless `--debug`.
    """
