"""Worker runtime: one engine per process, started by its environment's interpreter.

Imports only the standard library and pyzmq; exactly one engine module
imports its engine library, and only when that engine is chosen.
"""
