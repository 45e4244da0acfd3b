"""The one exception type spa raises for problems a user can fix."""


class SpaError(Exception):
    """A bad model, bad input or bad option. The command line prints its message as one line."""
