"""``python -m safeft``: the same as the ``safeft`` command."""

from safeft.cli import app

app(prog_name="safeft")
