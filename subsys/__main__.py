"""``python -m subsys``: the ``subsys`` command (how local harnesses start nodes)."""

from subsys.cli.main import main

main()
