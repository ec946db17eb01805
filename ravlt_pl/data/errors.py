"""The one exception type for bad datasets; the CLI prints it as a message, without a traceback."""


class DatasetError(ValueError):
    """Bad or missing input data. The message names the file (and record) and what was expected."""
