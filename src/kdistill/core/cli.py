"""Deprecated: the command line moved to `kdistill.cli`. `python -m kdistill.core.cli` keeps working
until kdistill 0.2 for launch commands written against it: run as a script, this module runs
`kdistill.cli` by name; imported, it imports nothing (core imports nothing above it)."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("kdistill.cli", run_name="__main__", alter_sys=True)
