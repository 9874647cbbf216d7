"""The answers evaluator: SQuAD scores, the perplexity on the teacher's answers, the table, errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from kdistill import ConfigError, EvalContext
from kdistill.evaluators.answers import COLUMNS, Answers, normalize, references_of, score

CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
QUESTIONS = ["the king will speak", "my lord shall go", "good night my love", "the queen will not sleep", "war and peace"]


@pytest.fixture(scope="module")
def models(tiny_assets):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    tokenizer.chat_template = CHAT
    teacher = LlamaForCausalLM.from_pretrained(tiny_assets["teacher"]).eval()
    torch.manual_seed(1)
    student = LlamaForCausalLM(teacher.config).eval()  # another random model of the same shape
    return tokenizer, teacher, student


class Teacher:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer


def questions_file(tmp_path, answers=None, column="question"):
    path = tmp_path / "questions.jsonl"
    answers = answers or ["the king", "lord", "night", "queen", "peace"]
    path.write_text("".join(json.dumps({column: q, "answer": a}) + "\n" for q, a in zip(QUESTIONS, answers)))
    return path


def context(models, phase, student=None, teacher=True, output_dir=None, logged=None):
    tokenizer, t, s = models
    return EvalContext(student=student if student is not None else s, teacher=Teacher(t, tokenizer) if teacher else None,
                       val_batches=None, tokenizer=tokenizer, phase=phase, output_dir=output_dir,
                       log_artifact=(lambda path, folder: logged.append((path, folder))) if logged is not None else None)


def evaluator(path, **options):
    return Answers(Answers.Options(paths=[str(path)], max_new_tokens=6, batch_size=2, **options))


def test_squad_normalisation_and_scores_against_hand_computed_values():
    assert normalize("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert normalize("An apple a day") == "apple day"
    assert score("the Beatles", ["Beatles"]) == {"em": 1.0, "f1": 1.0, "contains": 1.0}
    # answer "paris france" (2 words) vs reference "paris" (1): precision 1/2, recall 1 -> F1 2/3
    assert score("Paris, France.", ["Paris"]) == pytest.approx({"em": 0.0, "f1": 2 / 3, "contains": 1.0})
    # the best reference counts: "new york city" vs "york" (F1 2*(1/3*1)/(1/3+1) = 0.5) and "new york city" (1)
    assert score("New York City", ["York", "new york city"]) == {"em": 1.0, "f1": 1.0, "contains": 1.0}
    # "it is in york" (4 words) vs "new york" (2): 1 shared, precision 1/4, recall 1/2 -> F1 1/3
    assert score("It is in York.", ["new york"]) == pytest.approx({"em": 0.0, "f1": 2 * (1 / 4 * 1 / 2) / (1 / 4 + 1 / 2),
                                                                   "contains": 0.0})
    assert score("Yorkshire", ["York"])["contains"] == 0.0  # whole words only
    # TriviaQA's mapping: value and aliases, each once; NQ's list; a plain string
    assert references_of({"value": "Sinclair Lewis", "aliases": ["Harry Sinclair Lewis", "Sinclair Lewis"]}) == \
        ["Sinclair Lewis", "Harry Sinclair Lewis"]
    assert references_of(["1984", "", "nineteen eighty-four"]) == ["1984", "nineteen eighty-four"]
    assert references_of("Paris") == ["Paris"]
    assert score("harry sinclair lewis", references_of({"value": "Sinclair Lewis", "aliases": ["Harry Sinclair Lewis"]}))["em"] == 1.0


def greedy(model, prompt, max_new_tokens, stops):
    """Greedy decoding one token at a time on the whole sequence (no cache, no batch): the answer ids
    and the stop token when one ended it."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in stops:
                break
    return ids[len(prompt):]


def test_perplexity_on_teacher_answers_matches_an_independent_float64_reference(models, tmp_path):
    tokenizer, teacher, student = models
    ev = evaluator(questions_file(tmp_path), count=4)
    metrics = ev.evaluate(context(models, "during"))
    stops = [tokenizer.eos_token_id]
    total = {"student": 0.0, "teacher": 0.0}
    count = 0
    for i, question in enumerate(QUESTIONS[:4]):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True)
        prompt = prompt["input_ids"] if "input_ids" in prompt else prompt  # a BatchEncoding or a list, by version
        answer = greedy(teacher, prompt, 6, stops)
        assert ev._teacher_result["student_ids"][i] == answer  # as generated (with the stop token when it stopped)
        seq = torch.tensor([list(prompt) + answer])
        for name, model in (("student", student), ("teacher", teacher)):
            with torch.no_grad():
                logprobs = torch.log_softmax(model(seq).logits[0].double(), -1)
            total[name] -= sum(logprobs[len(prompt) - 1 + j, token].item() for j, token in enumerate(answer))
        count += len(answer)
    assert metrics["answers_ppl_on_teacher"] == pytest.approx(math.exp(total["student"] / count), rel=1e-5)
    assert metrics["teacher_answers_ppl"] == pytest.approx(math.exp(total["teacher"] / count), rel=1e-5)
    assert metrics["answers_ppl_on_teacher"] > metrics["teacher_answers_ppl"]  # a random student is worse


def test_reverse_kl_on_the_students_own_answers_matches_a_float64_reference(models, tmp_path):
    tokenizer, teacher, student = models
    metrics = evaluator(questions_file(tmp_path), count=3).evaluate(context(models, "during"))
    total, count = 0.0, 0
    for question in QUESTIONS[:3]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True)
        prompt = prompt["input_ids"] if "input_ids" in prompt else prompt
        answer = greedy(student, prompt, 6, [tokenizer.eos_token_id])  # the student's own answer, stop token included
        seq = torch.tensor([list(prompt) + answer])
        with torch.no_grad():
            log_ps = torch.log_softmax(student(seq).logits[0].double(), -1)
            log_pt = torch.log_softmax(teacher(seq).logits[0].double(), -1)
        for j in range(len(answer)):
            at = len(prompt) - 1 + j
            total += sum(math.exp(a) * (a - b) for a, b in zip(log_ps[at].tolist(), log_pt[at].tolist()))
        count += len(answer)
    assert metrics["answers_reverse_kl"] == pytest.approx(total / count, rel=1e-6)
    twin = evaluator(questions_file(tmp_path), count=3).evaluate(context(models, "during", student=copy.deepcopy(teacher)))
    assert twin["answers_reverse_kl"] == pytest.approx(0.0, abs=1e-9)


def test_student_identical_to_teacher_agrees_fully(models, tmp_path):
    tokenizer, teacher, _ = models
    path = questions_file(tmp_path)
    twin = copy.deepcopy(teacher)
    metrics = evaluator(path).evaluate(context(models, "during", student=twin))
    assert metrics["answers_teacher_em"] == 1.0 and metrics["answers_teacher_f1"] == 1.0
    assert metrics["answers_ppl_on_teacher"] == pytest.approx(metrics["teacher_answers_ppl"], rel=1e-9)
    for key in ("em", "f1", "contains"):
        assert metrics[f"answers_{key}"] == metrics[f"teacher_answers_{key}"]


def test_scores_from_the_table_with_answers_that_contain_the_reference(models, tmp_path, monkeypatch):
    path = questions_file(tmp_path, answers=[["x", "y"], ["lord"], ["z"], ["w"], ["v"]])
    ev = evaluator(path, first=1, count=3)
    assert ev._rows() == (QUESTIONS[1:4], [["lord"], ["z"], ["w"]])
    answers = iter([[10, 11], [12], [13]])
    monkeypatch.setattr(ev, "_answer", lambda model, tok, prompts, *progress: [next(answers) for _ in prompts])
    texts = {10: "my", 11: " Lord!", 12: "z", 13: "the w is it"}
    monkeypatch.setattr(models[0], "decode", lambda ids, skip_special_tokens: "".join(texts[i] for i in ids), raising=False)
    metrics = ev.evaluate(context(models, "during", teacher=False))
    # "my lord" vs "lord": EM 0, F1 2/3, contains 1; "z" vs "z": 1, 1, 1; "w is it" vs "w": 0, 2*(1/3)/(4/3) = 0.5, 1
    assert metrics == pytest.approx({"answers_em": 1 / 3, "answers_f1": (2 / 3 + 1 + 0.5) / 3, "answers_contains": 1.0})


def test_table_before_and_after_kept_for_a_resumed_run(models, tmp_path, capsys):
    path = questions_file(tmp_path)
    out = tmp_path / "run"
    logged: list = []
    ev = evaluator(path, count=3, show=2)
    before = ev.evaluate(context(models, "before", output_dir=out, logged=logged))
    assert set(before) == set(Answers.provides)
    resumed = evaluator(path, count=3, show=2)  # a new process: the before answers come from the run folder
    resumed.evaluate(context(models, "final", output_dir=out, logged=logged))
    table = json.loads((out / "answers" / "answers.table.json").read_text())
    assert table["columns"] == list(COLUMNS) == ["question", "reference", "teacher", "student_before", "student_after"]
    assert [row[0] for row in table["data"]] == QUESTIONS[:3]
    assert [row[1] for row in table["data"]] == ["the king", "lord", "night"]
    assert all(row[3] == row[4] for row in table["data"])  # the student did not change between the two
    assert all(row[2] for row in table["data"])
    rows = [json.loads(line) for line in (out / "answers" / "answers.jsonl").read_text().splitlines()]
    assert [list(r) for r in rows] == [list(COLUMNS)] * 3 and [r["student_after"] for r in rows] == [r[4] for r in table["data"]]
    markdown = (out / "answers" / "answers.md").read_text()
    assert "| question | reference | teacher | student_before | student_after |" in markdown
    assert {(p.rsplit("/", 1)[-1], f) for p, f in logged} == {(n, "answers") for n in ("answers.jsonl", "answers.md", "answers.table.json")}
    printed = capsys.readouterr().out
    assert QUESTIONS[0] in printed and QUESTIONS[1] in printed and QUESTIONS[2] not in printed
    assert "teacher_answers_ppl" in printed


def test_without_teacher_or_references_only_what_can_be_measured(models, tmp_path):
    path = questions_file(tmp_path)
    assert set(evaluator(path).evaluate(context(models, "during", teacher=False))) == {"answers_em", "answers_f1", "answers_contains"}
    metrics = evaluator(path, answer=None).evaluate(context(models, "during"))
    assert set(metrics) == {"answers_teacher_em", "answers_teacher_f1", "answers_ppl_on_teacher", "answers_reverse_kl",
                            "teacher_answers_ppl"}
    assert evaluator(path, phases=["final"]).evaluate(context(models, "during")) == {}


def test_missing_question_column_names_the_file_and_its_columns(models, tmp_path):
    path = questions_file(tmp_path, column="prompt")
    with pytest.raises(ConfigError) as caught:
        evaluator(path).evaluate(context(models, "before"))
    assert caught.value.problems == [f"evaluators: answers.options.question: {path} has no column 'question' "
                                     "(its columns: prompt, answer)"]
    with pytest.raises(ConfigError) as caught:
        evaluator(tmp_path / "nothing.jsonl").evaluate(context(models, "before"))
    assert caught.value.problems == [f"evaluators: answers.options.paths[0]: no such file or folder: {tmp_path / 'nothing.jsonl'}"]


def test_mlflow_tracker_logs_a_table_file_as_a_table(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from kdistill.plugins.trackers.mlflow_tracker import MlflowTracker

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(MlflowTracker.Options(experiment="tables", tracking_uri=uri))
    tracker.start("tables", {}, str(tmp_path / "run"))
    table = tmp_path / "answers.table.json"
    for rows in ([["q1", "a"]], [["q1", "a"], ["q2", "b"]]):  # logged again: replaced, not appended
        table.write_text(json.dumps({"columns": ["question", "student_after"], "data": rows}))
        tracker.log_artifact(str(table), "answers")
    tracker.finish()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "answers/answers.table.json", "type": "table"}]
    local = client.download_artifacts(tracker.run_id, "answers/answers.table.json", str(tmp_path / "down"))
    assert json.loads(open(local).read())["data"] == [["q1", "a"], ["q2", "b"]]


def test_in_a_run_before_and_after_with_a_chat_tokenizer(tiny_assets, tmp_path, models):
    import shutil

    from conftest import engine_for, tiny_recipe

    chat_teacher = tmp_path / "teacher"
    shutil.copytree(tiny_assets["teacher"], chat_teacher)
    models[0].save_pretrained(chat_teacher)  # the tokenizer with its chat template
    raw = tiny_recipe(tiny_assets, tmp_path / "run", steps=2)
    raw["teacher"]["options"]["model"] = str(chat_teacher)
    raw["evaluators"] = [{"name": "answers", "options": {"paths": [str(questions_file(tmp_path))], "count": 2,
                                                         "max_new_tokens": 4, "show": 1}}]
    summary = engine_for(raw).run()
    assert set(summary["before"]) == set(summary["after"]) & set(Answers.provides) == set(Answers.provides)
    assert summary["before"]["teacher_answers_ppl"] == summary["after"]["teacher_answers_ppl"]  # measured once
    rows = [json.loads(line) for line in (tmp_path / "run" / "answers" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["student_before"] is not None and r["student_after"] for r in rows)
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_tokenizer_without_chat_template_is_one_line(models, tmp_path, monkeypatch):
    monkeypatch.setattr(models[0], "chat_template", None)
    with pytest.raises(ConfigError) as caught:
        evaluator(questions_file(tmp_path)).evaluate(context(models, "before"))
    assert caught.value.problems[0].startswith("evaluators: answers: the tokenizer (") and "has no chat template" in caught.value.problems[0]
