"""The conversations data source: formats, answer-only labels, packing, order, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdistill
from conftest import cut_after, tiny_recipe
from kdistill import IGNORE_INDEX, ConfigError
from kdistill.plugins.data.conversations import Conversations

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
QA = [("who is the king", "the lord of the house"), ("what is war", "no peace"), ("speak of love", "love is good"),
      ("where do we go", "to the house of the queen"), ("when will we rest", "at night"), ("dream of what", "of peace and day")]


@pytest.fixture(scope="module")
def tok(tiny_assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def source(**options) -> Conversations:
    return Conversations(Conversations.Options(**options))


def counted_text(tok, batch: kdistill.Batch, row: int) -> str:
    labels = batch.labels[row]
    return tok.decode(labels[labels != IGNORE_INDEX].tolist())


def test_prompt_completion_counts_only_the_answer_in_the_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a} for q, a in QA])
    data = source(paths=[str(path)], columns={"prompt": "question", "completion": "answer"}, layout="pad", val_fraction=0, seq_len=200)
    data.setup(tok, seed=0)
    assert data.format == "prompt-completion" and data.n_train == len(QA)
    batch = data.batch_for_keys(torch.arange(len(QA)))
    for row, (question, answer) in enumerate(QA):
        assert counted_text(tok, batch, row) == answer + "</s>\n"
        full = tok.decode(torch.cat([batch.input_ids[row, :1], batch.labels[row][batch.labels[row] != IGNORE_INDEX]]).tolist())
        assert full.startswith("<") and answer in full
        # the input is exactly the chat template's rendering of the two turns
        rendered = tok.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                                           tokenize=False)
        n = int(batch.attention_mask[row].sum())
        assert tok.decode(batch.input_ids[row, :n].tolist() + [int(batch.labels[row, n - 1])]) == rendered


def test_messages_count_every_assistant_turn_and_loss_on_all_counts_everything(tmp_path, tok):
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who is the king"},
                    {"role": "assistant", "content": "the lord"}, {"role": "user", "content": "and the queen"},
                    {"role": "assistant", "content": "the lady"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}] * 3)
    data = source(paths=[str(path)], val_fraction=0, layout="pad", seq_len=128)
    data.setup(tok, seed=0)
    assert data.format == "messages"
    assert counted_text(tok, data.batch_for_keys(torch.tensor([0])), 0) == "the lord</s>\nthe lady</s>\n"
    everything = source(paths=[str(path)], val_fraction=0, layout="pad", seq_len=128, loss_on="all")
    everything.setup(tok, seed=0)
    batch = everything.batch_for_keys(torch.tensor([0]))
    assert int(batch.mask.sum()) == int(batch.attention_mask.sum())


def test_file_types_read_the_same_examples(tmp_path, tok):
    import datasets

    rows = [{"prompt": q, "completion": a} for q, a in QA]
    table = datasets.Dataset.from_list(rows)
    write_jsonl(tmp_path / "a.jsonl", rows)
    table.to_parquet(str(tmp_path / "a.parquet"))
    table.to_csv(str(tmp_path / "a.csv"), index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    whole = source(paths=[str(tmp_path / "a.jsonl")], val_fraction=0, seq_len=64, layout="pad")
    whole.setup(tok, seed=3)
    seen = []
    for path in ("a.jsonl", "a.parquet", "a.csv", "saved", "saved/data-00000-of-00001.arrow"):
        data = source(paths=[str(tmp_path / path)], val_fraction=0.2, seq_len=64)
        data.setup(tok, seed=3)
        seen.append([b.input_ids.tolist() for b in (data.train_batch(0, 2), *data.val_batches(2))])
        streamed = source(paths=[str(tmp_path / path)], val_fraction=0, seq_len=64, layout="pad", streaming=True)
        streamed.setup(tok, seed=3)
        epoch = [ex for i in range(len(QA)) for ex in example_rows(streamed.train_batch(i, 1))]
        assert sorted(epoch) == sorted(example_rows(whole.batch_for_keys(whole.train_keys())))
    assert all(s == seen[0] for s in seen)


def per_example_nll(model, batch: kdistill.Batch) -> list[float]:
    """Summed cross-entropy of each example of each row (examples told apart by restarting positions)."""
    with torch.no_grad():
        logits = model(**batch.model_inputs(), use_cache=False).logits.double()
    out = []
    for row in range(batch.input_ids.shape[0]):
        positions = batch.position_ids[row].tolist() if batch.position_ids is not None else list(range(batch.input_ids.shape[1]))
        starts = [i for i, p in enumerate(positions) if p == 0 or (i and p != positions[i - 1] + 1)] + [len(positions)]
        for a, b in zip(starts, starts[1:]):
            labels = batch.labels[row, a:b]
            if (labels != IGNORE_INDEX).any():
                out.append(float(torch.nn.functional.cross_entropy(logits[row, a:b], labels, reduction="sum")))
    return out


def test_a_packed_row_gives_each_example_the_loss_it_has_alone(tmp_path, tok, tiny_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"], torch_dtype=torch.float32).eval()
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "completion": a} for q, a in QA])
    packed = source(paths=[str(path)], val_fraction=0, seq_len=250)
    packed.setup(tok, seed=0)
    rows = packed.batch_for_keys(packed.train_keys())
    assert packed.n_train < len(QA) and rows.position_ids is not None  # several examples share a row
    alone = source(paths=[str(path)], val_fraction=0, seq_len=250, layout="pad")
    alone.setup(tok, seed=0)
    single = [per_example_nll(model, alone.batch_for_keys(torch.tensor([i])).rows(slice(0, 1)))[0] for i in range(len(QA))]
    together = per_example_nll(model, rows)
    assert together == pytest.approx(single, rel=1e-5, abs=1e-5)
    # and a row that mixed the examples' attention would not: the mask is what makes them agree
    mixed = kdistill.Batch(rows.input_ids, rows.labels, rows.attention_mask)
    with torch.no_grad():
        a = model(**rows.model_inputs(), use_cache=False).logits
        b = model(**mixed.model_inputs(), use_cache=False).logits
    assert not torch.allclose(a, b, atol=1e-4)


def test_order_is_a_function_of_seed_and_index_and_each_epoch_sees_every_example_once(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"{q} {i}", "completion": a} for i in range(8) for q, a in QA])
    for layout in ("pack", "pad"):
        first, again = source(paths=[str(path)], seq_len=160, layout=layout), source(paths=[str(path)], seq_len=160, layout=layout)
        first.setup(tok, seed=5)
        again.setup(tok, seed=5)
        n = first.n_train
        batches = [first.train_batch(i, 4) for i in range(n // 4)]
        assert torch.equal(again.train_batch(3, 4).input_ids, batches[3].input_ids)  # a resumed run's next batch
        keys = first.train_batch(0, n).keys.tolist()  # the first epoch, whole
        assert sorted(keys) == list(range(n))
        if layout == "pad":  # bucketed: a batch is padded to its longest, not to seq_len
            assert min(b.input_ids.shape[1] for b in batches) < 160


def test_too_long_examples_are_cut_dropped_or_refused(tmp_path, tok, caplog):
    rows = [{"prompt": q, "completion": a} for q, a in QA] + [{"prompt": "sleep", "completion": "dream " * 60}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    cut = source(paths=[str(path)], seq_len=100, val_fraction=0)
    cut.setup(tok, seed=0)
    assert cut.counts == {"examples": 7, "cut": 1, "dropped": 0}
    assert "1 were cut and 0 dropped" in caplog.text
    drop = source(paths=[str(path)], seq_len=100, val_fraction=0, too_long="drop")
    drop.setup(tok, seed=0)
    assert drop.counts == {"examples": 7, "cut": 0, "dropped": 1}
    rendered = tok.apply_chat_template([{"role": "user", "content": "sleep"}, {"role": "assistant", "content": "dream " * 60}],
                                       tokenize=False)
    n = len(tok(rendered, add_special_tokens=False)["input_ids"])
    with pytest.raises(ConfigError) as err:
        source(paths=[str(path)], seq_len=100, too_long="error").setup(tok, seed=0)
    assert str(err.value) == (f"data.options.seq_len: {path} row 6 has {n} tokens, more than seq_len 100 + 1 "
                              "(too_long: error; or truncate | drop)")


@pytest.mark.parametrize("rows, options, message", [
    ([{"question": "a", "answer": "b"}] * 3, {"columns": {"prompt": "question", "completion": "reply"}},
     "data.options.columns.completion: {path} has no column 'reply' (it has: question, answer)"),
    ([{"question": "a", "answer": "b"}] * 3, {},
     "data.options.format: {path} has none of the columns messages, prompt + completion, or text (it has: question, answer); "
     "name them in data.options.columns (prompts alone: format: prompt)"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}], {},
     "data: {path} row 0: messages[1].role: unknown role 'bot' (expected one of system, user, assistant, tool)"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
      {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}], {},
     "data: {path} row 1: messages[1].content: an empty assistant turn"),
    ([{"prompt": "a", "completion": 3}], {}, "data: {path} row 0: completion is int, not text"),
])
def test_bad_rows_are_one_line_naming_file_row_and_field(tmp_path, tok, rows, options, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError) as err:
        source(paths=[str(path)], **options).setup(tok, seed=0)
    assert str(err.value) == message.format(path=path)


def test_a_tokenizer_without_a_chat_template_is_named(tmp_path, tiny_assets):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "completion": a} for q, a in QA])
    with pytest.raises(ConfigError) as err:
        source(paths=[str(path)]).setup(plain, seed=0)
    assert str(err.value).startswith("data.options.chat_template: the tokenizer (")
    assert str(err.value).endswith(") has no chat template; use a chat model's tokenizer or set chat_template: false")
    plain_text = source(paths=[str(path)], chat_template=False, val_fraction=0, layout="pad")
    plain_text.setup(plain, seed=0)
    assert counted_text(plain, plain_text.batch_for_keys(torch.tensor([0])), 0) == QA[0][1] + "<eos>"


def example_rows(batch: kdistill.Batch) -> list[list[int]]:
    """The token ids of every example of a batch (packed rows split where positions restart)."""
    out = []
    for row in range(batch.input_ids.shape[0]):
        n = int(batch.attention_mask[row].sum())
        positions = batch.position_ids[row, :n].tolist() if batch.position_ids is not None else list(range(n))
        starts = [i for i, p in enumerate(positions) if p == 0] + [n]
        out += [batch.input_ids[row, a:b].tolist() for a, b in zip(starts, starts[1:])]
    return out


@pytest.mark.parametrize("layout", ["pack", "pad"])
def test_streaming_reads_every_training_example_once_per_epoch_in_an_order_set_by_seed_and_index(tmp_path, tok, layout):
    import datasets

    rows = [{"prompt": f"{q} {i}", "completion": a} for i in range(10) for q, a in QA]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"))
    options = {"paths": [str(tmp_path / "qa.parquet")], "seq_len": 160, "layout": layout, "val_fraction": 0.2,
               "max_val_examples": 8, "streaming": True, "shuffle_buffer": 16}
    streamed = source(**options)
    streamed.setup(tok, seed=7)
    assert streamed.n_train is None and streamed.n_val >= 1
    whole = source(**{**options, "streaming": False, "val_fraction": 0})
    whole.setup(tok, seed=7)
    everything = sorted(example_rows(whole.batch_for_keys(whole.train_keys())))
    val = [ex for b in streamed.val_batches(4) for ex in example_rows(b)]
    assert 1 <= len(val) <= 8
    # the first epoch of training batches holds every example that is not held out, each once (held-out rows
    # past max_val_examples are used for neither)
    n_train = sum(not streamed._held_out(row) for row in range(len(rows)))
    assert n_train < len(rows) - len(val)
    seen: list[list[int]] = []
    index = 0
    while len(seen) < n_train:
        seen += example_rows(streamed.train_batch(index, 4))
        index += 1
    epoch = seen[:n_train]
    assert not any(ex in val for ex in epoch)
    assert len({tuple(ex) for ex in epoch}) == n_train and all(ex in everything for ex in epoch)
    # shuffled, not file order; a fresh source asked for a later batch first gives the same batch (a resume)
    assert epoch[:10] != everything[:10]
    again = source(**options)
    again.setup(tok, seed=7)
    assert again.fingerprint() == streamed.fingerprint()
    assert torch.equal(again.train_batch(index - 2, 4).input_ids, streamed.train_batch(index - 2, 4).input_ids)
    assert torch.equal(again.train_batch(1, 4).input_ids, streamed.train_batch(1, 4).input_ids)  # back: read again
    other = source(**options)
    other.setup(tok, seed=8)
    assert not torch.equal(other.train_batch(0, 4).input_ids, streamed.train_batch(0, 4).input_ids)


def test_streaming_refuses_a_teacher_cache_and_unbounded_validation(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "completion": a} for q, a in QA])
    streamed = source(paths=[str(path)], streaming=True, val_fraction=0)
    streamed.setup(tok, seed=0)
    with pytest.raises(ConfigError) as err:
        streamed.train_keys()
    assert str(err.value) == ("data.options.streaming: a streamed source gives its rows no stable keys, so teacher outputs "
                              "cannot be cached for it; use streaming: false")
    with pytest.raises(ValueError, match="streaming with val_fraction > 0 needs max_val_examples"):
        source(paths=[str(path)], streaming=True, max_val_examples=None)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_run_trains_on_packed_conversations_and_resumes_exactly(tmp_path, tok, tiny_assets, streaming):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_assets["teacher"], teacher)
    tok.save_pretrained(teacher)  # the same tokenizer, now with a chat template
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"{q} {i}", "completion": a} for i in range(6) for q, a in QA])
    raw = tiny_recipe({**tiny_assets, "teacher": str(teacher)}, tmp_path / "run", steps=4, save_every=2)
    raw["data"] = {"name": "conversations", "options": {"paths": [str(path)], "seq_len": 160, "val_fraction": 0.1,
                                                        "streaming": streaming, "shuffle_buffer": 8}}
    summary = kdistill.run(raw)
    assert summary["after"]["val/student_loss"] < summary["before"]["val/student_loss"]
    resumed = cut_after(raw, tmp_path / "resumed", "step-00000004")
    kdistill.run(resumed, resume=True)
    a = load_file(str(Path(raw["output_dir"]) / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_streamed_run_stops_in_one_line_at_a_bad_row_far_into_the_file(tmp_path, tok, tiny_assets, monkeypatch):
    from kdistill.plugins.data import conversations

    monkeypatch.setattr(conversations, "RENDER_ROWS", 4)  # rows are rendered as training reaches them, 4 at a time
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_assets["teacher"], teacher)
    tok.save_pretrained(teacher)
    rows = [{"prompt": f"{q} {i}", "completion": a} for i in range(8) for q, a in QA] + [{"prompt": "a", "completion": 3}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    raw = tiny_recipe({**tiny_assets, "teacher": str(teacher)}, tmp_path / "run", steps=30, save_every=4, batch_size=2)
    raw["data"] = {"name": "conversations", "options": {"paths": [str(path)], "seq_len": 64, "val_fraction": 0,
                                                        "streaming": True, "shuffle_buffer": 4}}
    raw["evaluators"] = []
    with pytest.raises(ConfigError) as err:
        kdistill.run(raw)
    assert str(err.value) == f"data: {path} row 48: completion is int, not text"
    assert sorted(p.name for p in (tmp_path / "run").glob("**/step-*"))[-1] >= "step-00000012"  # what was trained is kept


def test_prompts_alone_end_where_the_answer_begins_and_count_nothing(tmp_path, tok):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q, _ in QA])
    data = source(paths=[str(path)], val_fraction=0, layout="pad", seq_len=64, format="prompt")
    data.setup(tok, seed=0)
    assert data.format == "prompt" and data.n_train == len(QA)
    batch = data.batch_for_keys(torch.arange(len(QA)))
    assert bool((batch.labels == IGNORE_INDEX).all())
    for row, (question, _) in enumerate(QA):
        n = int(batch.attention_mask[row].sum())
        rendered = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        assert tok.decode(batch.input_ids[row, :n].tolist()) == rendered  # every prompt token is an input
