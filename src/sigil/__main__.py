"""Allow ``python -m sigil``."""

from sigil.cli import main

raise SystemExit(main())
