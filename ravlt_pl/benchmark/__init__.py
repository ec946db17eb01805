"""Speed benchmark (``python -m ravlt_pl benchmark``) and the plain reference RAVLT it compares against."""
