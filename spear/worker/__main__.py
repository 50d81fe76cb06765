"""`python -m spear.worker MODULE:FUNCTION`: serve a Python function as a spear worker."""

from spear.worker.launch import main

raise SystemExit(main())
