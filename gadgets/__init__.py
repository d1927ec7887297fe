"""Gadgetron gadgets: plain ``f(connection)`` callables over ``gadgetron.external.Connection``.

Importing any of them makes gadgetron-python's reader raise at end of stream instead of spinning
(:mod:`gadgets.connection_eof`). A real Gadgetron's ``python -m gadgetron PORT MODULE TARGET`` imports the module
only after the connection has read CONFIG and HEADER, so a Gadgetron that goes away while sending those two (it
sends them as soon as the gadget connects) still leaves that process spinning; a resident ``gadget-server``
imports it first and is covered throughout."""
from .connection_eof import raise_on_eof

raise_on_eof()
