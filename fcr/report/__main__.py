"""``python -m fcr.report --root outputs/embedded``: format the report of an analysed run (``python -m fcr.pipeline report`` analyses first)."""

import sys

from fcr.report.tables import main

if __name__ == "__main__":
    sys.exit(main())
