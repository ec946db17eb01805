"""``benchmark --help`` explains every option and gives its default."""

import argparse

from ravlt_pl.benchmark import runner


def test_every_benchmark_option_has_help_and_shows_its_default(capsys, monkeypatch):
    parsers = []
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, argv=None: parsers.append(self))
    runner.parse_args([])
    (parser,) = parsers
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {"models", "resolutions", "batch_sizes", "rounds", "out"} <= {a.dest for a in options}
    assert [a.dest for a in options if not a.help] == []
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    text = parser.format_help()
    assert "(default: ravlt_s_reference)" in text and "(default: reports/benchmark)" in text and "(default: 5)" in text
