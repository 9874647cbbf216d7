"""Deprecated: the command line moved to `kdistill.cli`. `python -m kdistill.core.cli` keeps working
until kdistill 0.2 for launch commands written against it (the one import of core from above,
allowed by the layering contract for this module only)."""

from kdistill.cli import app, main  # noqa: F401

if __name__ == "__main__":
    main()
