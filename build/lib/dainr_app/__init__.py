"""The product shell around :mod:`dainr`: MRD I/O, command line, previews, benchmarks."""
