"""controlplane: a multi-region high-availability control plane daemon."""

__version__ = "0.1.0"
