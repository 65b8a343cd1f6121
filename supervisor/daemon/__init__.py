"""The daemon: the composition root (app.py) and how it is run (run.py)."""
