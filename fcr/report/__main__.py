"""``python -m fcr.report --root outputs/embedded [--readme README.md]``: rebuild the report from results."""

import sys

from fcr.report.tables import main

if __name__ == "__main__":
    sys.exit(main())
