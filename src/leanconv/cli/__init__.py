"""The ``leanconv`` command line; ``main.py`` dispatches to one module per subcommand."""
