"""`python -m supervisor` is the `bluegreen` command."""

from .cli import main

raise SystemExit(main())
