"""Gadgetron gadgets: plain ``f(connection)`` callables over ``gadgetron.external.Connection``."""
