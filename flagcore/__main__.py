"""``python -m flagcore``: the command-line face of the library."""

from .cli import main

raise SystemExit(main())
