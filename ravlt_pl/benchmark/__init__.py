"""Speed benchmark (``python -m ravlt_pl benchmark``) and the authors'-arithmetic RAVLT it compares against.

``docs/benchmark.md`` lists the modules and what each measures.
"""
