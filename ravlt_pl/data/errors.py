"""The one exception type for bad datasets; the CLI prints it as a message, without a traceback."""

_WORKER_PREFIX = f"{__name__}.DatasetError: "


class DatasetError(ValueError):
    """Bad or missing input data. The message names the file (and record) and what was expected.

    Raised in a DataLoader worker, it reaches the main process as ``DatasetError("Caught DatasetError
    in DataLoader worker process N. Original Traceback ...")`` (torch rebuilds the type from the
    worker's formatted traceback). The message is then cut back to the worker's one line, so a
    callback or the CLI sees the file it names; the worker's traceback stays in ``worker_traceback``.
    """

    def __init__(self, message: str = "") -> None:
        self.worker_traceback: str | None = None
        if "DataLoader worker" in message and _WORKER_PREFIX in message:
            self.worker_traceback = message
            message = message[message.rindex(_WORKER_PREFIX) + len(_WORKER_PREFIX) :].strip()
        super().__init__(message)
