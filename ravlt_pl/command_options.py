"""The option parser of our subcommands (``analyze-rank``, ``export``, ``benchmark``): jsonargparse's, with
one-line errors."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NoReturn

from jsonargparse import ArgumentParser

#: A value that starts with "-" but is no option: a negative number (``--atol -1``).
NEGATIVE_NUMBER = re.compile(r"-\d[\d.e+-]*|-\.\d[\d.e+-]*")


class OneLineErrorParser(ArgumentParser):
    """jsonargparse's parser (typed options, ``--options FILE``, ``--print_config``) whose bad values end
    in one line, ``--num-images: expected int, got 'abc'``, not its multi-line report of the type check."""

    def one_line(self, message: str) -> str:
        """jsonargparse's report of a failed type check as ``--option: expected TYPE, got 'VALUE'``."""
        key = re.match(r'Parser key "([^"]+)":', message)
        action = next((a for a in self._actions if key and a.dest == key[1]), None)
        given = re.search(r"(?:Given value|Got value): (.*)$", message, re.MULTILINE)
        if action is not None and given:
            hint = getattr(action, "_typehint", None)
            expected = getattr(hint, "__name__", str(hint).replace("typing.", ""))
            return f"{action.option_strings[-1]}: expected {expected}, got {given[1]!r}"
        return message

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(self.one_line(message), ex)

    def split_known(self, argv: Sequence[str]) -> tuple[list[str], list[str]]:
        """``argv`` as (this parser's options with their values, the rest), each in order: argparse's
        ``parse_known_args``, which jsonargparse refuses (typos in configs would pass unnoticed)."""
        flags = {flag for action in self._actions for flag in action.option_strings}
        ours: list[str] = []
        rest: list[str] = []
        target = rest
        for token in argv:
            if token.startswith("-") and not NEGATIVE_NUMBER.fullmatch(token):
                target = ours if token.split("=", 1)[0] in flags else rest
            target.append(token)
        return ours, rest
