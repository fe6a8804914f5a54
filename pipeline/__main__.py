"""`python -m pipeline ...` is the same as the `twin-dpo` command."""

from pipeline.cli import entry

entry()
