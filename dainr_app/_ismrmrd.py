"""``ismrmrd``, imported without its side effect on the process: its ``image`` module calls
``warnings.simplefilter('default')`` at import, which put a filter in front of a host's own (a test suite's
``"error"``, a notebook's ``"ignore"``) and showed every library's DeprecationWarnings.  Every module of ours that
uses ismrmrd imports it from here first."""
import warnings

with warnings.catch_warnings():
    import ismrmrd
    import ismrmrd.serialization  # noqa: F401  (imported here too, so no later import runs ismrmrd's code)
    import ismrmrd.xsd  # noqa: F401

__all__ = ["ismrmrd"]
