"""One module per ``hifusion`` subcommand: ``add_parser(subparsers, name)`` and ``run(args)``."""
