"""`python -m covidseg`: the same command as the `covidseg` script."""

from covidseg.cli import app

app(prog_name="covidseg")
