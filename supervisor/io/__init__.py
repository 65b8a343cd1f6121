"""Sockets, worker processes and the event feed: where the core meets the world."""
