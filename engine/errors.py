"""The one error type the engine raises for bad input."""


class WuerstchenError(ValueError):
    """Bad input from a caller: a request, a file, a folder or a setting.

    The message is one line that names the field, the value and what was expected. The CLI prints it
    without a traceback; Python callers can catch it as a `ValueError`.
    """
