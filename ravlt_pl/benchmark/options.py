"""The parser of ``python -m ravlt_pl benchmark`` and of ``python -m ravlt_pl.benchmark.train_memory``."""

from __future__ import annotations

import sys

from jsonargparse import ActionConfigFile

from ..command_options import OneLineErrorParser


class OptionParser(OneLineErrorParser):
    """jsonargparse's parser (typed options, ``--config`` YAML, ``--print_config``) with one-line errors."""

    def __init__(self, prog: str, description: str) -> None:
        super().__init__(prog=prog, description=description)
        self.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (keys: the dests)")

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        sys.stderr.write(f"error: {' '.join(self.one_line(message).split())} (every option: {self.prog} --help)\n")
        self.exit(2)
