"""``python -m hpsearch METHOD ...`` is ``python -m hpsearch.run METHOD ...``."""

import sys

from hpsearch.run import main

sys.exit(main())
