"""Errors that the CLI turns into one line per problem on stderr and exit code 2."""

from __future__ import annotations


class KdistillError(Exception):
    """A problem in the user's input: reported plainly, exit code 2, nothing written."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(KdistillError):
    """Every problem found in a recipe, each as `dotted.path: message`."""


class RegistryError(KdistillError):
    """Components that clash or cannot be found."""


class ComponentError(KdistillError):
    """A component raised during the run: not the user's input, so exit code 1 and the cause's traceback."""

    exit_code = 1
