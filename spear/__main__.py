"""`python -m spear`: the same as the `spear` command."""

from spear.cli import main

raise SystemExit(main())
