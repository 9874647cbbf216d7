"""What packing gains over length-bucketed padding on the chat quickstart's real data: tokens per second.

    python benchmarks/packing.py                       # answers written once into /tmp/kdistill-packing-answers
    python benchmarks/packing.py --answers runs/quickstart-chat-answers --rows 8 --rounds 5   # the recipe's step

The data is the chat quickstart's (recipe quickstart-chat): the teacher SmolLM2-135M-Instruct's greedy answers
to 192 NQ questions, written by the recipe's generator (what `kdistill generate` runs) into --answers unless
that folder already holds them (the first run spends about 4 minutes on an idle 2-core CPU writing them; later
runs reuse them). One engine is built from the recipe: its teacher, its 20-layer student, forward KL +
cross-entropy, AdamW, gradient clipping. It trains on two `conversations` layouts of the same answers:
`layout: pack` (examples packed into rows of seq_len 256 positions, positions restarting, a block-diagonal
causal mask) and `layout: pad` (one example per row, a batch padded to its longest example).

Round r takes the next answers, in table order, that fill --rows packed rows (default 4, about 12 answers; the
recipe's batch is 8 rows: --rows 8 takes twice as long) and trains on exactly those answers in each layout,
through two data sources on those table rows (first / max_examples, val_fraction 0), each cutting its epoch
into batches in its own order as `train_batch` does: pack in one step of the --rows full rows, pad in one step
of all those examples (--pad-batch-size N: steps of N examples, sorted by length as the layout buckets them).
So within a round both layouts see the same examples, answer tokens and real tokens. Every step is the
engine's own `train_step` (teacher forward, student forward and backward, clipping, AdamW update; the batch is
built inside the step, as in a run). The layouts take turns (pack, pad, pack, pad, ...) after one small
untimed warm-up step each; the student keeps training throughout (speed does not depend on its weights).

Reported per layout, medians over rounds: the steps' wall time a round, answer (counted) tokens/s, real
tokens/s (input tokens that are not padding), positions/s (padding included), the padding fraction, and the
memory a step adds (CPU: peak resident set during the round's steps, VmHWM reset through /proc/self/clear_refs,
minus the resident set before them, taken after malloc_trim so memory freed earlier does not count; CUDA:
max_memory_allocated minus memory_allocated before); then pack / pad, and the ratio of answer tokens/s round by
round. For reference it prints the padding fraction of both layouts over a whole epoch of all the training
answers, as a run lays them out (pad bucketed across batches, which one batch of a round cannot be).

This machine may run other jobs: the load average before and after is printed; other jobs slow both layouts,
which take turns, so compare the ratios more than the figures. The default (3 rounds of 4 rows), answers
already written, took 9 min 17 s on the 2-core CPU at load average 5 (other sessions' training jobs sharing
the cores; a step's time then varies by +-50% from round to round, so the figures are rough); an idle machine
runs a step 3 to 4 times faster (docs/conversations.md's idle figures), about 2 minutes in all.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import statistics
import time
from pathlib import Path

from loss import read_peak, reset_peak, rss_bytes  # benchmarks/loss.py: the same memory probes

DEFAULT_ANSWERS = Path("/tmp/kdistill-packing-answers")


def release_freed_memory() -> None:
    """Hand freed heap back to the kernel (glibc), so the resident set is what is in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def epoch_batches(data, batch_size: int) -> list[list[int]]:
    """The units (packed rows or examples) of every batch of epoch 0 in the data source's own order (what
    train_batch takes); the last batch holds what is left, so the epoch covers every example once."""
    order = data._epoch_order(0, batch_size)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padding_fraction(data, batch_size: int) -> float:
    """Padding share of the positions of one epoch of `data` cut into batches of `batch_size` units."""
    real = positions = 0
    for units in epoch_batches(data, batch_size):
        batch = data._batch(units)
        real, positions = real + int(batch.attention_mask.sum()), positions + batch.input_ids.numel()
    return 1 - real / positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=Path, default=DEFAULT_ANSWERS,
                        help="the teacher's answers (a kdistill generate folder); written there first when incomplete")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4, help="packed rows a round, one step (the recipe's batch_size is 8)")
    parser.add_argument("--pad-batch-size", type=int, default=None,
                        help="examples a padded step (default: all of the round's, one step)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    began_all = time.perf_counter()

    import tempfile

    import torch

    from kdistill.cli import RECIPES_DIR
    from kdistill.core.config import load_recipe, resolve
    from kdistill.core.engine import Engine
    from kdistill.core.plugins import make_plugin_manager
    from kdistill.core.registry import Registry

    answers = args.answers.resolve()
    work = Path(tempfile.mkdtemp(prefix="kdistill-packing-"))  # the engine's output folder; nothing is written
    overrides = [f"generator.options.output={answers}", f"data.options.paths=[{answers}]", "data.options.layout=pack",
                 "evaluators=[]", "tracker={name: jsonl}", "train.save_every=0", "train.eval_every=0",
                 "train.steps=1000", f"train.batch_size={args.rows}", f"output_dir={work}"]
    pm = make_plugin_manager()
    registry = Registry.from_plugins(pm)
    plan = resolve(load_recipe(RECIPES_DIR / "quickstart-chat.yaml", overrides), registry)
    engine = Engine(plan, pm, registry)
    began = time.perf_counter()
    engine.build()  # loads the teacher, writes the answers unless complete, cuts the student, reads the data
    built = time.perf_counter() - began
    with contextlib.suppress(OSError):
        work.rmdir()
    whole, seed, device, tokenizer = engine.data, plan.recipe.train.seed, engine.device, engine.tokenizer

    def source(layout: str, **update):
        data = type(whole)(whole.options.model_copy(update={"layout": layout, **update}))
        data.setup(tokenizer, seed)
        return data

    whole_pad = source("pad")
    per_row = whole_pad.n_train / whole.n_train
    reference_pad = args.pad_batch_size or round(args.rows * per_row)
    reference = (f"a run's epoch of all {whole_pad.n_train} training answers: pack {whole.n_train} rows of "
                 f"{whole.options.seq_len} ({per_row:.2f} answers a row), padding {padding_fraction(whole, args.rows):.1%}; "
                 f"pad bucketed, padding {padding_fraction(whole_pad, reference_pad):.1%} in batches of {reference_pad}, "
                 f"{padding_fraction(whole_pad, args.rows):.1%} in batches of {args.rows}")
    in_order = source("pack", val_fraction=0.0)._units  # every answer, packed in table order
    chunks = [in_order[i:i + args.rows] for i in range(0, len(in_order) - args.rows + 1, args.rows)]
    cuda = device.type == "cuda"
    peak_ok = cuda or reset_peak()

    def sources(r: int) -> dict:
        """Round r's answers (those filling the next --rows packed rows) in each layout, all trained on."""
        chunk = chunks[r % len(chunks)]
        where = {"first": chunk[0][0].row, "max_examples": sum(len(row) for row in chunk), "val_fraction": 0.0}
        return {"pack": source("pack", **where), "pad": source("pad", **where)}

    def sizes(made: dict) -> dict:
        return {"pack": made["pack"].n_train, "pad": args.pad_batch_size or made["pad"].n_train}

    step_index = 0

    def run_step(data, units: list[int]) -> dict[str, float]:
        """One training step of the engine on these units; its wall time and token counts."""
        nonlocal step_index
        seen: dict[str, float] = {}

        def micro_batch(index: int):
            batch = data._batch(units)  # what train_batch builds for these units
            seen.update(counted=float(batch.mask.sum()), real=float(batch.attention_mask.sum()),
                        positions=float(batch.input_ids.numel()))
            return batch.to(device)

        engine.micro_batch = micro_batch
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.train_step(step_index)
        if cuda:
            torch.cuda.synchronize()
        seen["seconds"] = time.perf_counter() - start
        step_index += 1
        return seen

    print(f"answers {answers}: {whole.counts['examples']} answers; engine built in {built:.0f} s (answers written "
          f"there first if they were missing)\n{reference}", flush=True)
    warm = sources(0)
    for layout, data in warm.items():  # untimed warm-up: a step of one unit each
        run_step(data, epoch_batches(data, sizes(warm)[layout])[0][:1])
    results: dict[str, list[dict[str, float]]] = {"pack": [], "pad": []}
    for r in range(args.rounds):
        made = warm if r == 0 else sources(r)
        for layout, data in made.items():
            release_freed_memory()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                base = rss_bytes()
                reset_peak()
            batches = epoch_batches(data, sizes(made)[layout])
            steps = [run_step(data, units) for units in batches]
            peak = torch.cuda.max_memory_allocated() if cuda else read_peak()
            total = {key: sum(s[key] for s in steps) for key in ("seconds", "counted", "real", "positions")}
            examples = sum(len(data._units[u]) for units in batches for u in units)
            total.update(steps=len(steps), rows=sum(len(units) for units in batches),
                         added=(peak - base) if peak_ok and peak is not None else float("nan"))
            results[layout].append(total)
            print(f"round {r + 1} {layout}: {examples} answers (table rows from {data.options.first}) in {len(steps)} "
                  f"step(s) of {total['rows']:.0f} rows, {total['seconds']:.1f} s, {total['counted']:.0f} answer tokens, "
                  f"{total['counted'] / total['seconds']:.1f} answer tokens/s, padding "
                  f"{1 - total['real'] / total['positions']:.1%}", flush=True)

    columns = [
        ("steps a round", lambda t: t["steps"], "{:.0f}"),
        ("rows a round", lambda t: t["rows"], "{:.0f}"),
        ("steps' wall a round (s)", lambda t: t["seconds"], "{:.1f}"),
        ("s per step", lambda t: t["seconds"] / t["steps"], "{:.1f}"),
        ("answer tokens a round", lambda t: t["counted"], "{:,.0f}"),
        ("answer tokens/s", lambda t: t["counted"] / t["seconds"], "{:.1f}"),
        ("real tokens/s", lambda t: t["real"] / t["seconds"], "{:.1f}"),
        ("positions/s (padding included)", lambda t: t["positions"] / t["seconds"], "{:.1f}"),
        ("padding fraction", lambda t: 1 - t["real"] / t["positions"], "{:.1%}"),
        ("memory a step adds (MiB)", lambda t: t["added"] / 2 ** 20, "{:,.0f}"),
    ]

    def median(layout: str, value) -> float:
        return statistics.median(value(t) for t in results[layout])

    load_after = os.getloadavg()
    print(f"\ntorch {torch.__version__}, {device}, {torch.get_num_threads()} threads; {args.rounds} rounds, medians; "
          f"load average (1 min) {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (other jobs slow both layouts); total wall time {time.perf_counter() - began_all:.0f} s")
    print("| layout | " + " | ".join(name for name, _, _ in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    pad_step = f"{args.pad_batch_size} examples a step" if args.pad_batch_size else "the same answers in one step"
    labels = {"pack": f"`pack` ({args.rows} rows of {whole.options.seq_len}, one step)", "pad": f"`pad` ({pad_step})"}
    for layout in ("pack", "pad"):
        print(f"| {labels[layout]} | " + " | ".join(fmt.format(median(layout, value)) for _, value, fmt in columns) + " |")
    ratios = []
    for _, value, _ in columns:
        pad_value = median("pad", value)
        ratios.append(f"{median('pack', value) / pad_value:.2f}x" if pad_value else "-")
    print("| pack / pad | " + " | ".join(ratios) + " |")
    per_round = [a["counted"] / a["seconds"] / (b["counted"] / b["seconds"]) for a, b in zip(results["pack"], results["pad"])]
    print(f"\npack / pad answer tokens/s by round (same examples within a round): "
          f"{', '.join(f'{x:.2f}x' for x in per_round)}; median {statistics.median(per_round):.2f}x")


if __name__ == "__main__":
    main()
