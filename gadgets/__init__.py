"""Gadgetron gadgets: plain ``f(connection)`` callables over ``gadgetron.external.Connection``.

Importing any of them (a real Gadgetron imports the module before the connection reads) makes gadgetron-python's
reader raise at end of stream instead of spinning (:mod:`gadgets.connection_eof`)."""
from .connection_eof import raise_on_eof

raise_on_eof()
