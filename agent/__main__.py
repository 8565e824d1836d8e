"""Allow ``python -m agent`` as well as the ``dirigo`` console script."""

from agent.cli import main

raise SystemExit(main())
