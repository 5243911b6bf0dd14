"""The project's own Raft engine (issue 12): a pure core, a checksummed journal, an
authenticated transport and a threaded shell. Generic: it knows nothing about regions.
"""
