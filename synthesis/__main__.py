"""``python -m coalign.synthesis ...``: the same as ``coalign synthesize ...`` (and how Fabric relaunches ranks)."""

import sys

from .cli import synthesize_command

sys.exit(synthesize_command(sys.argv[1:]))
