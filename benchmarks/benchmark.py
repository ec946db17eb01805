"""Script form of ``python -m ravlt_pl benchmark`` (the runner lives in ``ravlt_pl/benchmark/runner.py``)."""

from ravlt_pl.benchmark.runner import main

if __name__ == "__main__":
    main()
