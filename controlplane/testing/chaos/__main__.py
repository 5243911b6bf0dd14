import sys

from controlplane.testing.chaos.cli import main

sys.exit(main())
