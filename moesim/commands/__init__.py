"""One module per ``moesim`` subcommand: ``add_arguments(parser)`` and ``run(args)``."""
