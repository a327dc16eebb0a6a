"""``python -m atman_kernels.cli``: the ``atman`` command."""

import sys

from . import main

sys.exit(main())
