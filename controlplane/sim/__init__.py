"""Stand-ins for the world outside the control plane, for the demo and the tests.

`controlplane.sim.backend` simulates a region's service that can be made to fail.
This package imports nothing itself so that `python -m controlplane.sim.backend`
runs the module once, as `__main__`, without a second copy imported by the package.
"""
