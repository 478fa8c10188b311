"""``python -m edgesplit.linksim``: the same as ``edgesplit linksim``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
