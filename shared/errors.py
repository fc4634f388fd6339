class UserError(Exception):
    """An error the user caused (bad flag, missing file, corrupt input).

    The CLI prints it as one line and exits with code 2; servers map it to a 4xx.
    """
