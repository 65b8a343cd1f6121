"""node-supervisor as a Windows service (pywin32).

``python -m winservice install|remove|start|stop|debug``; see README.md in
this directory.  ``service`` needs pywin32 (Windows only); ``paths`` and
``runner`` do not, so their logic is the same everywhere.
"""
