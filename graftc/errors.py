"""User-facing errors: one line saying what is wrong, where, and what is allowed."""


class GraftError(Exception):
    """Bad input or an impossible request. The CLI prints it on one line and exits with code 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
