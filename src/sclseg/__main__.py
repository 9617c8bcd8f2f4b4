"""``python -m sclseg`` (and ``torchrun ... -m sclseg train CONFIG``)."""

import sys

from sclseg.cli import main

sys.exit(main())
