"""`python -m unionfs` runs the layerfs command."""

import sys

from unionfs.cli import main

sys.exit(main())
