"""``python -m bench [--quick] [--device cuda]``: see bench/harness.py and docs/performance.md."""

from .harness import main

raise SystemExit(main())
