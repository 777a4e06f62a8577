"""The ``rnnkit`` command line: ``demo``, ``check``; one module per subcommand."""
