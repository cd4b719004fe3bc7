"""``python -m buzzdask``: the command line."""

from buzzdask.cli import main

raise SystemExit(main())
