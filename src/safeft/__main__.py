"""``python -m safeft``: the same as the ``safeft`` command."""

from safeft.cli import app

if __name__ == "__main__":
    app(prog_name="safeft")
