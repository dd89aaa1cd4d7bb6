"""``python -m bench [--quick] [--device cuda]``: see bench/harness.py and bench/RESULTS.md."""

from .harness import main

raise SystemExit(main())
