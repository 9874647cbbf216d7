"""Errors that the CLI turns into one line per problem on stderr and exit code 2."""

from __future__ import annotations

from typing import Any, Callable


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


class RunFailed(KdistillError):
    """The run itself went wrong (diverged, too many steps skipped): not the input, so exit code 1."""

    exit_code = 1


def blame(exc: Exception, entries: Any, where_step: str, kept: str = "") -> ComponentError:
    """Name the plugin whose code raised: the innermost traceback frame inside a registered component's
    module (or, for third-party plugins, its top-level package). `entries`: the registry's entries."""
    modules: dict[str, Any] = {}
    for entry in entries:
        module = entry.cls.__module__
        modules.setdefault(module, entry)
        if not module.startswith("kdistill."):
            modules.setdefault(module.split(".")[0], entry)
    culprit = None
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        entry = modules.get(name) or (modules.get(name.split(".")[0]) if not name.startswith("kdistill.") else None)
        culprit = entry or culprit
        tb = tb.tb_next
    where = f"{culprit.kind.replace('_', ' ')} '{culprit.name}' of {culprit.source}" if culprit else "the run"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return ComponentError(f"{where_step}: {where} raised {type(exc).__name__}: {first}{kept}")


def guarded(call: Callable[[Any], Any], argument: Any, where: str, entries: Any, latest_checkpoint: Callable[[], Any]) -> Any:
    """`call(argument)`; an exception other than kdistill's own becomes one ComponentError naming the
    plugin whose code raised and `where`, and whether a checkpoint survives."""
    try:
        return call(argument)
    except KdistillError:
        raise
    except Exception as exc:
        latest = latest_checkpoint()
        raise blame(exc, entries, where, f"; the last checkpoint ({latest}) is intact" if latest else "") from exc


def os_error_line(exc: OSError) -> str:
    """An OSError as one line that names the file: `PATH: No space left on device`."""
    what = exc.strerror or str(exc) or type(exc).__name__
    return f"{exc.filename}: {what}" if exc.filename else what
