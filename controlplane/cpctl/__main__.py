"""`python -m controlplane.cpctl`, the same as the `cpctl` command."""

from controlplane.cpctl import main

main()
