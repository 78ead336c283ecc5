"""``python -m zsfw`` (and ``torchrun -m zsfw``): the ``zsfw`` command."""

import sys

from zsfw.cli import main

sys.exit(main())
