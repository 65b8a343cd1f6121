"""node-supervisor: the daemon, its CLI and the Python client.

Importing this package loads nothing heavy, so ``supervisor.client`` stays a
light import (pyzmq and the wire protocol only).  Note: supervisord also
installs a package named ``supervisor``; this one lives in its own virtual
environment (see README).
"""

__version__ = "0.1.0"
