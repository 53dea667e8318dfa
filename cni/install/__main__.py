"""``python -m cni.install``: the same as ``install-cni``."""

import sys

from cni.install.loop import main

sys.exit(main())
