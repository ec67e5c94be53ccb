"""``python -m dsfs``: the ``dsfs`` command (what `dsfs.parallel.launch` starts in each worker)."""

from dsfs.cli import main

raise SystemExit(main())
