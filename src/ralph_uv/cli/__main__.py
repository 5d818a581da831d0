"""``python -m ralph_uv.cli``: the same as the ``ralph-uv`` command."""

from ralph_uv.cli import main

main()
