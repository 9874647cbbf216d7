"""A GGUF teacher is dequantized once: the first load writes a safetensors copy (with its tokenizer) to
kdistill's cache, later loads read it and compute exactly what the dequantized file computes; a file with
other content gets a new copy, KDISTILL_CACHE=off writes none, and a cache that cannot be written costs a
warning."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from conftest import byte_level_bpe, cli_result, make_text

pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>\n{% endfor %}"
TEXTS = ["The king shall speak of war and peace.", "Thou good lady, come and rest with me tonight."]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """A tiny Llama with tied embeddings, exported as Q8_0 (so loading it dequantizes) and as F16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gguf-copy")
    tok = byte_level_bpe(make_text(), 320)
    tok.chat_template = CHAT
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=True))
    model.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    files = {}
    for dtype in ("q8_0", "f16"):
        files[dtype] = root / dtype / "tiny.gguf"
        files[dtype].parent.mkdir()
        code, _, stderr = cli_result("export-gguf", root / "student", "--out", files[dtype], "--dtype", dtype)
        assert code == 0, stderr
    return files


@pytest.fixture
def gguf_file(gguf_files):
    return gguf_files["q8_0"]


def logits(model, tokenizer):
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def loads(monkeypatch):
    """Record the keyword arguments of every from_pretrained call (which file each load reads)."""
    from transformers import AutoModelForCausalLM

    calls: list[dict] = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        calls.append({"path": str(path), **kwargs})
        return original(cls, path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return calls


def test_the_second_load_reads_the_copy_and_computes_the_same(gguf_file, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from kdistill.core.models import dequantized_folder, load_causal_lm, load_tokenizer

    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    calls = loads(monkeypatch)
    first = load_causal_lm(str(gguf_file), "teacher.options.model")
    first_tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)  # straight from the file
    folder = dequantized_folder(gguf_file)
    assert folder is not None and folder.parent == tmp_path / "cache" / "gguf" and folder.name.startswith("tiny-")
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporary folder left
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    second, second_tok = load_causal_lm(str(gguf_file), "teacher.options.model"), load_tokenizer(str(gguf_file), "teacher.options.model")
    assert [c.get("gguf_file") for c in calls] == ["tiny.gguf", None] and calls[1]["path"] == str(folder)

    assert second_tok.get_vocab() == first_tok.get_vocab() and len(second_tok) == len(first_tok)
    for text in [*TEXTS, "<eos> the queen"]:
        assert second_tok(text)["input_ids"] == first_tok(text)["input_ids"]
    assert second_tok.chat_template == first_tok.chat_template == CHAT
    assert (second_tok.eos_token, second_tok.pad_token) == (first_tok.eos_token, first_tok.pad_token)
    assert second.config.tie_word_embeddings and second.get_output_embeddings().weight is second.get_input_embeddings().weight
    assert torch.equal(logits(second, second_tok), logits(first, first_tok))

    half = load_causal_lm(str(gguf_file), "teacher.options.model", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and calls[-1]["path"] == str(folder)
    assert all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(half.state_dict().values(), first.state_dict().values()))


def test_a_changed_file_gets_a_new_copy_and_a_broken_copy_is_rebuilt(gguf_files, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from kdistill.core.models import dequantized_folder, load_causal_lm

    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    teacher = tmp_path / "teacher.gguf"
    teacher.write_bytes(gguf_files["q8_0"].read_bytes())
    load_causal_lm(str(teacher), "teacher.options.model")
    old = dequantized_folder(teacher)
    assert old is not None and old.is_dir()
    elsewhere = tmp_path / "elsewhere" / "teacher.gguf"  # the same file in another place shares the copy
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(teacher.read_bytes())
    assert dequantized_folder(elsewhere) == old

    teacher.write_bytes(gguf_files["f16"].read_bytes())  # the file replaced by another export of the weights
    new = dequantized_folder(teacher)
    assert new is not None and new != old and not new.exists()
    calls = loads(monkeypatch)
    model = load_causal_lm(str(teacher), "teacher.options.model")
    assert calls[0].get("gguf_file") == "teacher.gguf" and (new / "config.json").is_file()
    f16 = AutoModelForCausalLM.from_pretrained(str(gguf_files["f16"].parent), gguf_file="tiny.gguf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), f16.state_dict().values()))

    (new / "model.safetensors").unlink()  # a copy without its weights is not read; it is written again
    load_causal_lm(str(teacher), "teacher.options.model")
    assert calls[2].get("gguf_file") == "teacher.gguf" and (new / "model.safetensors").is_file()


def test_off_writes_nothing_and_an_unwritable_cache_costs_a_warning(gguf_file, tmp_path, monkeypatch, caplog):
    from kdistill.core.models import dequantized_folder, load_causal_lm

    monkeypatch.setenv("KDISTILL_CACHE", "off")
    assert dequantized_folder(gguf_file) is None
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_causal_lm(str(gguf_file), "teacher.options.model")
    assert not (tmp_path / "home").exists() and not (tmp_path / "xdg").exists()

    monkeypatch.delenv("KDISTILL_CACHE")
    (tmp_path / "xdg").mkdir()
    (tmp_path / "xdg" / "kdistill").write_text("a file where the cache folder would be")
    assert dequantized_folder(gguf_file).parent == tmp_path / "xdg" / "kdistill" / "gguf"
    with caplog.at_level(logging.WARNING, logger="kdistill"):
        model = load_causal_lm(str(gguf_file), "teacher.options.model")
    assert model is not None
    assert [r.getMessage() for r in caplog.records] == [
        f"could not cache the dequantized tiny.gguf in {tmp_path / 'xdg' / 'kdistill' / 'gguf'} (Not a directory); "
        "it is dequantized again next time"]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes: pip install 'kdistill[quant]' (.ci/run does)")
def test_a_quantized_load_reads_the_copy_the_first_time_too(gguf_file, tmp_path, monkeypatch):
    """nf4 from a GGUF: the first load writes the copy and quantizes that, as every later load does, so both
    compute the same (and the weights are not written twice)."""
    from transformers import AutoTokenizer

    from kdistill.core.models import dequantized_folder, load_causal_lm

    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    calls = loads(monkeypatch)
    first = load_causal_lm(str(gguf_file), "teacher.options.model", quantization="nf4").eval()
    second = load_causal_lm(str(gguf_file), "teacher.options.model", quantization="nf4").eval()
    folder = dequantized_folder(gguf_file)
    assert [c["path"] for c in calls] == [str(gguf_file.parent), str(folder), str(folder)]
    assert [type(m.model.layers[0].mlp.down_proj).__name__ for m in (first, second)] == ["Linear4bit"] * 2
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert torch.equal(logits(first, tok), logits(second, tok))
