"""`python -m opdgraph` runs the command-line interface."""

from opdgraph.cli import main

raise SystemExit(main())
