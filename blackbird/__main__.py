"""``python -m blackbird``: the command line (see ``blackbird --help``)."""

from blackbird._cli import main

raise SystemExit(main())
