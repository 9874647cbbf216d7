"""A teacher served from an offline top-k cache, and `kdistill cache-teacher`, which writes it.

The store itself (file layout, writer, memory-mapped reader) is `cache_store`.
"""

from __future__ import annotations

import concurrent.futures
import warnings
from pathlib import Path
from typing import Any, List, Literal

import torch
from pydantic import Field

import kdistill
from kdistill import ConfigError, resolve_path
from kdistill.plugins.teachers.cache_store import TeacherCache, check_top_k_losses, vocab_digest, weights_digest, write_cache
from kdistill.plugins.teachers.hf import HFTeacher
from kdistill.plugins.teachers.served import ServedTeacher
from kdistill.toolkit import SET_HELP, fail, load_tokenizer, pick_device, plan_recipe, seed_everything


def source_identity(options: HFTeacher.Options) -> dict:
    """What the manifest records about the teacher the cache came from: a digest of its weights and the
    options that change its outputs; not its path (a teacher moved keeps its cache, one re-saved does not)."""
    weights = weights_digest(resolve_path(options.model, "teacher.options.source.model"), options.gguf_file)
    kept = options.model_dump(mode="json", exclude={"model", "gguf_file", "trust_remote_code"})
    return {"provider": HFTeacher.name, "weights": weights, **kept}


def teacher_present(options: HFTeacher.Options) -> bool:
    path = resolve_path(options.model, "teacher.options.source.model")
    return (path / options.gguf_file if options.gguf_file else path).exists()


class SourceOptions(HFTeacher.Options):
    """The live teacher, as the `hf` teacher's options; its model need not be on the machine that trains
    from the cache (validate does not require it): cache-teacher and load_source load it."""

    model: str = Field(description="local folder, .gguf file, or pkg://PACKAGE/PATH; without it the cache is "
                       "used unchecked against the teacher's weights")


class CachedTeacher(kdistill.TeacherProvider):
    """Top-k log-probabilities with their token ids and tail mass (or k sampled tokens), read from a cache; no
    teacher forward.

    `source` is the live teacher the cache is computed from (`kdistill cache-teacher RECIPE`). With
    `load_source`, that model is also loaded (not run) for what needs its weights: a student cut from
    the teacher's layers and the teacher's own validation metrics.
    """

    name = "cached"
    runs_forward = False  # the engine counts no teacher FLOPs per step
    scores_new_text = False  # it holds targets for the data's own text only

    class Options(kdistill.ConstantTemperatureOptions):  # the temperature the log-probabilities are computed at
        path: str = Field(description="the cache folder")
        source: SourceOptions | None = Field(None, description="the live teacher the cache is computed from")
        served: ServedTeacher.Options | None = Field(None, description="or: a vLLM server the cache is computed from "
                                                     "(the vllm teacher's options; k and temperature are the cache's)")
        mode: Literal["top-k", "sampled"] = Field("top-k", description="top-k: the k most likely tokens and a tail "
                                                  "bin (biased: the tail's shape is lost); sampled: k tokens drawn from "
                                                  "the teacher's distribution, stored as their ids (unbiased for "
                                                  "forward-kl, the only loss it serves)")
        k: int = Field(64, ge=1, description="log-probabilities kept per position (mode sampled: draws)")
        prefetch: bool = Field(True, description="read the next batches' targets in a background thread while "
                               "the student trains")
        shard_sequences: int = Field(256, ge=1, description="sequences per shard file")
        load_source: bool = Field(False, description="also load the source model's weights (for a from_teacher "
                                  "student and teacher metrics); it never runs in a training step")

    def load(self, device: torch.device) -> None:
        self.cache = TeacherCache(resolve_path(self.options.path, "teacher.options.path"))
        self.tokenizer = load_tokenizer(str(self.cache.folder / "tokenizer"), "teacher.options.path")
        self.device = device
        self.model = None
        if self.options.load_source:
            if self.options.source is None:
                raise ConfigError("teacher.options.load_source: needs teacher.options.source")
            if not teacher_present(self.options.source):
                raise ConfigError(f"teacher.options.source.model: no such file or folder: {self.options.source.model} "
                                  "(teacher.options.load_source needs it)")
            live = HFTeacher(self.options.source)
            live.load(device)
            self.model = live.model

    def prepare(self, data, tokenizer, losses) -> None:
        check_top_k_losses(losses, self.options.temperature, teacher="a cached teacher",
                           targets="the cached teacher's targets", at="the cached teacher's is",
                           field="teacher.options.temperature", mode=self.options.mode)
        expected = {"data_fingerprint": data.fingerprint(), "tokenizer": vocab_digest(tokenizer), "mode": self.options.mode,
                    "k": self.options.k, "temperature": self.options.temperature}
        source = self.options.source
        if source is not None and not self.options.load_source and not teacher_present(source):
            warnings.warn(f"teacher.options.source.model: {source.model} is not on this machine; the cache at "
                          f"{self.options.path} is used without checking it against the teacher's weights", stacklevel=2)
        elif source is not None:
            expected["teacher"] = source_identity(source)
            self.cache.check_teacher(expected["teacher"], source.model)
        elif self.options.served is not None:  # a served teacher's weights cannot be read: its name stands for them
            expected["teacher"] = served_identity(self.options.served)
        self.cache.check(expected)

    def outputs(self, batch: kdistill.Batch, needs: kdistill.Needs) -> kdistill.ModelOutputs:
        if needs.hidden_layers or needs.attention_layers:
            raise ConfigError("a cached teacher has no hidden states or attention maps")
        if batch.keys is None:
            raise ConfigError("data: a cached teacher needs a data source that gives its sequences keys")
        pending = getattr(self, "_ahead", {}).pop(_key(batch), None)
        sparse = pending.result() if pending is not None else self._read(batch)
        return kdistill.ModelOutputs(sparse=sparse.to(self.device))

    def prefetch(self, batches: list[kdistill.Batch]) -> None:
        """Start reading the targets of the batches asked for next, so reading overlaps the student's step."""
        if not self.options.prefetch:
            return
        if not hasattr(self, "_ahead"):
            self._ahead: dict[tuple, concurrent.futures.Future] = {}
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kdistill-cache")
        wanted = {_key(batch): batch for batch in batches if batch.keys is not None}
        for key in list(self._ahead):
            if key not in wanted:
                self._ahead.pop(key).cancel()
        for key, batch in wanted.items():
            if key not in self._ahead:
                self._ahead[key] = self._worker.submit(self._read, batch)

    def _read(self, batch: kdistill.Batch) -> kdistill.SparseTargets:
        """The batch's targets from the cache, cut to its length (rows padded to their batch's longest are a
        prefix of the cached length)."""
        length = batch.input_ids.shape[1]
        return self.cache.lookup(batch.keys).slice_positions(length)


def _key(batch: kdistill.Batch) -> tuple:
    return (tuple(batch.keys.tolist()), batch.input_ids.shape[1])


def served_identity(options: ServedTeacher.Options) -> dict:
    return {"provider": ServedTeacher.name, "model": options.model}


def cache_folder(options: CachedTeacher.Options) -> Path:
    return resolve_path(options.path, "teacher.options.path")


def cache_from_plan(plan, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """`kdistill cache-teacher`: the recipe's `cached` teacher names its live `source`; run that once."""
    resolved = plan.one("teacher")
    if resolved is None or not issubclass(resolved.entry.cls, CachedTeacher) or \
            (resolved.options.source is None) == (resolved.options.served is None):
        raise ConfigError("teacher: cache-teacher needs a teacher {name: cached, options: {path: ..., source: {model: ...}}} "
                          "(source: the live teacher to compute the cache from; or served: {urls: [...], model: ...}, "
                          "a vLLM server; one of the two)")
    options, train = resolved.options, plan.recipe.train
    seed_everything(train.seed)
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    device = pick_device(train.device)
    if options.served is not None:
        return cache_from_server(plan, options, device, overwrite, progress)
    live = HFTeacher(options.source)
    live.load(device)
    data = plan.one("data").build()
    data.setup(live.tokenizer, train.seed)
    return write_cache(live, data, cache_folder(options), k=options.k, temperature=options.temperature,
                       shard_sequences=options.shard_sequences, batch_size=train.eval_batch_size or train.batch_size,
                       device=device, teacher_identity=source_identity(options.source), overwrite=overwrite,
                       progress=progress, mode=options.mode, seed=train.seed)


def cache_from_server(plan, options: CachedTeacher.Options, device, overwrite: bool, progress: bool) -> dict[str, Any]:
    """The cache from a vLLM server: the data tokenized with the student's tokenizer, which must be the server's."""
    student = plan.recipe.student
    if student.tokenizer is None and student.model is None:
        raise ConfigError("student.tokenizer: a cache from a served teacher tokenizes the data with the student's "
                          "tokenizer; give student.model or student.tokenizer")
    field = "student.tokenizer" if student.tokenizer else "student.model"
    tokenizer = load_tokenizer(str(resolve_path(student.tokenizer or student.model, field)), field)
    assert options.served is not None
    if options.mode == "sampled":
        raise ConfigError("teacher.options.mode: sampled draws from the teacher's whole distribution; a served teacher "
                          "gives its top k only (use mode: top-k)")
    live = ServedTeacher(options.served.model_copy(update={"k": options.k, "temperature": options.temperature}))
    live.load(device)
    data = plan.one("data").build()
    data.setup(tokenizer, plan.recipe.train.seed)
    live.prepare(data, tokenizer, [])
    return write_cache(live, data, cache_folder(options), k=options.k, temperature=options.temperature,
                       shard_sequences=options.shard_sequences, batch_size=plan.recipe.train.eval_batch_size or
                       plan.recipe.train.batch_size, device=device, teacher_identity=served_identity(options.served),
                       overwrite=overwrite, progress=progress, tokenizer=tokenizer)


@kdistill.hookimpl
def kd_register_teachers():
    return [CachedTeacher]


@kdistill.hookimpl
def kd_register_commands(app):
    import typer

    @app.command("cache-teacher")
    def cache_teacher(recipe: Path = typer.Argument(..., help="recipe YAML whose teacher is {name: cached, options: {path, source}}"),
                      set_: List[str] = typer.Option([], "--set", help=SET_HELP),
                      overwrite: bool = typer.Option(False, "--overwrite", help="replace a cache of something else at the path")) -> None:
        """Run the teacher once over the training data; write its top-k log-probabilities (resumable)."""
        try:
            manifest = cache_from_plan(plan_recipe(recipe, set_), overwrite=overwrite)
        except kdistill.KdistillError as exc:
            fail(exc)
        sampled = manifest.get("mode") == "sampled"
        error = "" if sampled else f", largest log-probability error {manifest['max_abs_logprob_error']:.4f}"
        print(f"teacher cache: {manifest['n_sequences']} sequences, {manifest['tokens']} tokens, "
              f"{'sampled, ' if sampled else ''}k={manifest['k']}, T={manifest['temperature']}: "
              f"{manifest['shard_bytes'] / 2**20:.1f} MiB, {manifest['bytes_per_token']:.1f} bytes per token{error}")
