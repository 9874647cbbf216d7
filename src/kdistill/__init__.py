"""kdistill: knowledge distillation for large language models.

The public API that plugins import: `hookimpl`, `Options`, the component base classes and the
data types passed between them, plus `load_recipe`, `resolve` and `run`.
"""

from kdistill.__about__ import __version__
from kdistill.core.components import (
    IGNORE_INDEX,
    Batch,
    Component,
    ConstantTemperatureOptions,
    DataSource,
    EvalContext,
    Evaluator,
    FeatureLoss,
    Generator,
    LayerMap,
    LayerMapper,
    LogitLoss,
    Loss,
    ModelOutputs,
    Needs,
    Options,
    Scheduler,
    SparseTargets,
    Strategy,
    TeacherProvider,
    TemperatureOptions,
    Tracker,
    TrainContext,
)
from kdistill.core.config import Plan, Recipe, load_recipe, resolve
from kdistill.core.errors import ConfigError, KdistillError
from kdistill.core.hookspecs import hookimpl
from kdistill.core.paths import LocalFile, LocalPath, LocalPattern, resolve_path
from kdistill.core.schedule import Schedule, Scheduled, value_at


def run(recipe, overrides=(), resume: bool = False, overwrite: bool = False):
    """Run a recipe (a path or a raw mapping); returns the engine's summary dict."""
    from kdistill.core.engine import run_recipe

    return run_recipe(recipe, overrides=overrides, resume=resume, overwrite=overwrite)


__all__ = [
    "IGNORE_INDEX", "Batch", "Component", "ConfigError", "ConstantTemperatureOptions", "Schedule", "Scheduled",
    "TemperatureOptions", "value_at", "DataSource", "EvalContext", "Evaluator", "FeatureLoss", "Generator", "LayerMap",
    "KdistillError", "LayerMapper",
    "LocalFile", "LocalPath", "LocalPattern", "LogitLoss", "Loss", "ModelOutputs", "Needs", "Options", "Plan", "Recipe",
    "Scheduler", "SparseTargets", "Strategy", "TeacherProvider", "Tracker", "TrainContext", "__version__", "hookimpl",
    "load_recipe", "resolve", "resolve_path", "run",
]
