"""``python -m asyncckpt``: the command-line interface (see ``asyncckpt --help``)."""

from ._cli import main

raise SystemExit(main())
