"""``python -m ralph_uv.daemon``: the ``ralphd`` command, without needing it on ``PATH``."""

from ralph_uv.cli.daemon import main

main()
