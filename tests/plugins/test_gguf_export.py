"""`kdistill export-gguf`: tiny Llama students (tied and untied embeddings) written as GGUF and read back
by transformers' GGUF loader: the same logits (f32 to float tolerance; f16 and q8_0 within stated
tolerances and the same top-1 token), the same token ids, the chat template; bad input as one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import byte_level_bpe, cli_result, make_text

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>\n{% endfor %}"
TEXTS = ["The king shall speak of war and peace.", "Thou good lady, come and rest with me tonight.",
         "My sword, my crown, my house: fly to the queen!", "  two spaces, digits 12345 and a caf\u00e9"]
# What a tiny random model's logits may move by, relative to their standard deviation over the
# vocabulary, and the share of positions whose most likely token may change (measured: f16 0.2%,
# q8_0 3-4% of the std; top-1 the same at 61-62 of 62 positions).
TOLERANCE = {"f16": (0.01, 1.0), "q8_0": (0.10, 0.95)}


def tokenizer_with_merges(text: str):
    """A byte-level BPE tokenizer with merges (the conftest one has a vocabulary of bytes only)."""
    fast = byte_level_bpe(text, 320)
    fast.add_tokens(["<note>"])  # a user-defined (not special) added token
    fast.chat_template = CHAT
    return fast


def save(folder: Path, model, tokenizer) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """Run folders' final/ models: Llama with untied embeddings (and an embedding matrix padded past the
    tokenizer), Llama with tied ones, and a Mistral."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    root = tmp_path_factory.mktemp("gguf")
    tok = tokenizer_with_merges(make_text())
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=128, rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    rope = {"rope_type": "default", "rope_theta": 50000.0}  # not the default base: the file must carry it
    folders = {}
    for name, tied, vocab in (("untied", False, len(tok) + 6), ("tied", True, len(tok))):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=tied, rope_parameters=rope, **shape))
        folders[name] = save(root / f"run-{name}" / "final", model, tok)
    (folders["tied"] / "README.md").write_text("---\nlibrary_name: transformers\nlicense: apache-2.0\n"
                                               "tags: [kdistill, knowledge-distillation]\n---\n# run-tied: a student\n")
    torch.manual_seed(1)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=len(tok), sliding_window=None, rope_parameters=rope, **shape))
    folders["mistral"] = save(root / "mistral-student", mistral, tok)
    return folders


def export(folder: Path, out: Path, dtype: str, *extra) -> tuple[int, str, str]:
    return cli_result("export-gguf", folder, "--out", out, "--dtype", dtype, *extra)


def logits(model, tokenizer):
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).logits
    return out[batch["attention_mask"].bool()].double()


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_the_export_loads_back_with_the_same_logits_and_tokens(students, tmp_path, which, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = students[which]
    out = tmp_path / f"student-{dtype}.gguf"  # a folder with the file alone: everything comes from it
    code, stdout, stderr = export(folder, out, dtype)
    assert code == 0, stderr
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    count = 2 * 9 + 2 + (0 if which == "tied" else 1)
    assert stdout == f"{out}: {out.stat().st_size / 2**20:.1f} MiB, {dtype}, {count} tensors (GGUF architecture llama)\n"
    assert len(tensors) == count and ("output.weight" in tensors) == (which == "untied")
    types = {t.tensor_type.name for name, t in tensors.items() if not name.endswith("norm.weight")}
    assert types == {dtype.upper()} and {t.tensor_type.name for name, t in tensors.items() if name.endswith("norm.weight")} == {"F32"}
    assert not list(tmp_path.glob(".*tmp"))

    original = AutoModelForCausalLM.from_pretrained(folder).eval()
    original_tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert model.config.tie_word_embeddings == (which == "tied")
    assert model.config.rope_parameters["rope_theta"] == 50000.0

    for text in [*TEXTS, "<note> the king<eos>"]:
        assert tok(text)["input_ids"] == original_tok(text)["input_ids"], text
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.chat_template == CHAT and (tok.eos_token, tok.pad_token) == ("<eos>", "<pad>")

    a, b = logits(original, original_tok), logits(model, tok)
    assert a.shape == b.shape and a.shape[0] > 40
    if dtype == "f32":
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    else:
        spread, (moved, agree) = a.std(), TOLERANCE[dtype]
        assert (a - b).abs().max() <= moved * spread, (dtype, float((a - b).abs().max() / spread))
        assert (a.argmax(-1) == b.argmax(-1)).double().mean() >= agree


def test_q8_0_blocks_hold_each_weight_to_half_a_step(students, tmp_path):
    """Tensor by tensor: dequantized Q8_0 within half a quantization step (block max / 127) of the
    original, plus the step's own f16 rounding, once q and k are reordered as the export does."""
    from safetensors.torch import load_file

    from kdistill.plugins.export.gguf_export import rotary_pairs_adjacent

    out = tmp_path / "q8.gguf"
    assert export(students["untied"], out, "q8_0")[0] == 0
    weights = load_file(students["untied"] / "model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    by_gguf = {names.get_name(k, try_suffixes=(".weight",)): v for k, v in weights.items()}
    for tensor in gguf.GGUFReader(out).tensors:
        original = by_gguf[tensor.name].float()
        if ".attn_q." in tensor.name or ".attn_k." in tensor.name:
            original = rotary_pairs_adjacent(original, 4 if ".attn_q." in tensor.name else 2)
        back = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy()).reshape(original.shape)
        if tensor.tensor_type.name == "F32":
            assert torch.equal(back, original), tensor.name
            continue
        blocks = original.reshape(-1, 32)
        step = blocks.abs().amax(-1, keepdim=True) / 127
        bound = 0.5 * step + 127 * (step - step.half().float()).abs()  # the step is stored as f16
        assert ((back.reshape(-1, 32) - blocks).abs() <= bound * 1.001 + 1e-9).all(), tensor.name


def test_mistral_is_written_as_llama_and_loads_back_the_same(students, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "mistral.gguf"
    code, _, stderr = export(students["mistral"], out, "f32")
    assert code == 0, stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    original = AutoModelForCausalLM.from_pretrained(students["mistral"]).eval()
    tok = AutoTokenizer.from_pretrained(students["mistral"])
    torch.testing.assert_close(logits(model, tok), logits(original, tok), rtol=1e-5, atol=1e-5)


def test_default_output_is_in_the_folder_named_by_dtype_and_run(students):
    folder = students["tied"]
    code, stdout, stderr = cli_result("export-gguf", folder)
    out = folder / "model-f16.gguf"
    try:
        assert code == 0, stderr
        assert stdout.startswith(f"{out}: ") and ", f16, 20 tensors" in stdout
        fields = gguf.GGUFReader(out).fields
        assert fields["general.name"].contents() == "run-tied"  # final/ is named after its run
        assert fields["general.tags"].contents() == ["kdistill", "knowledge-distillation"]  # from the model card
        assert fields["general.license"].contents() == "apache-2.0"
        assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
        assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
        assert fields["tokenizer.ggml.add_bos_token"].contents() is False
        types = fields["tokenizer.ggml.token_type"].contents()
        assert types[:2] == [3, 3] and types[-1] == 4  # <pad>, <eos> control; <note> user-defined
    finally:
        out.unlink(missing_ok=True)


def test_an_existing_output_is_kept_without_overwrite(students, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"not mine")
    code, stdout, stderr = export(students["tied"], out, "f32")
    assert (code, stdout, stderr) == (2, "", f"error: {out}: exists; pass --overwrite to replace it\n")
    assert out.read_bytes() == b"not mine"
    code, _, stderr = export(students["tied"], out, "f32", "--overwrite")
    assert code == 0, stderr
    assert out.read_bytes()[:4] == b"GGUF"


def test_an_unknown_architecture_is_one_line(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path / "gpt2")
    code, stdout, stderr = cli_result("export-gguf", tmp_path / "gpt2")
    assert (code, stdout) == (2, "")
    assert stderr == f"error: {tmp_path / 'gpt2'}: GGUF export knows llama, mistral (config.json's model_type); this model is 'gpt2'\n"
    assert not list((tmp_path / "gpt2").glob("*.gguf"))


def test_other_bad_input_is_one_line_each(students, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    cases = {
        (tmp_path / "nowhere",): f"{tmp_path / 'nowhere'}: no such folder",
        (tmp_path / "empty",): f"{tmp_path / 'empty'}: no config.json; give a folder written by save_pretrained (a run's final/)",
        (students["tied"], "--dtype", "q4_0", "--out", tmp_path / "x.gguf"): "--dtype: 'q4_0'; one of f32, f16, q8_0",
    }
    spm = tmp_path / "spm"  # a sentencepiece-style tokenizer: Metaspace, byte fallback
    shutil.copytree(students["tied"], spm)
    spec = json.loads((spm / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": []}
    (spm / "tokenizer.json").write_text(json.dumps(spec))
    cases[(spm,)] = (f"{spm / 'tokenizer.json'}: GGUF export writes byte-level BPE tokenizers (GPT-2 style); this one is "
                     "BPE with decoder Sequence and byte fallback (sentencepiece style)")
    split = tmp_path / "split"  # byte-level, but cut by a rule it does not know
    shutil.copytree(students["tied"], split)
    spec = json.loads((split / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Isolated", "invert": False},
        {**spec["pre_tokenizer"], "use_regex": False}]}
    (split / "tokenizer.json").write_text(json.dumps(spec))
    cases[(split,)] = (f"{split / 'tokenizer.json'}: GGUF export recognises the pre-tokenizers GPT-2's (gpt-2), SmolLM's "
                       "(smollm), Llama 3's (llama-bpe); this one is Split + ByteLevel")
    for args, line in cases.items():
        assert cli_result("export-gguf", *args) == (2, "", f"error: {line}\n")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    assert cli_result("export-gguf", students["tied"], "--out", tmp_path / "x.gguf") == (
        2, "", "error: export-gguf needs the gguf package: pip install 'kdistill[gguf]'\n")
    assert not (tmp_path / "x.gguf").exists()


def test_a_failure_while_writing_leaves_no_file(students, tmp_path, monkeypatch):
    import kdistill
    from kdistill.plugins.export import gguf_export

    calls = {"n": 0}
    quantize = gguf.quants.quantize

    def failing(data, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device", str(tmp_path / "m.gguf"))
        return quantize(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(kdistill.KdistillError, match="No space left on device"):
        gguf_export.export_gguf(students["untied"], tmp_path / "m.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path):
    """llama.cpp takes Llama 3's rope scaling as a tensor of frequency divisors: the same as the ratio of
    transformers' plain and llama3 inverse frequencies."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    tok = tokenizer_with_merges(make_text(50))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=512, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32))
    expected = plain / scaled.double()
    # kept (1), slowed by the factor (8), and blended between: all three bands are in this head
    assert expected.min() == pytest.approx(1.0) and expected.max() == pytest.approx(8.0)
    assert ((expected > 1.01) & (expected < 7.99)).any()

    torch.manual_seed(0)
    save(tmp_path / "llama3", LlamaForCausalLM(config), tok)
    code, _, stderr = cli_result("export-gguf", tmp_path / "llama3", "--dtype", "f32")
    assert code == 0, stderr
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "llama3" / "model-f32.gguf").tensors}
    written = torch.from_numpy(tensors["rope_freqs.weight"].data.copy()).double()
    torch.testing.assert_close(written, expected, rtol=1e-5, atol=0)


def test_pre_tokenizers_are_recognised_by_shape_or_refused():
    from kdistill.plugins.export.gguf_export import LLAMA3_SPLIT, pre_tokenizer_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                     byte_level]}) == "smollm"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {**byte_level, "use_regex": False}]}
    assert pre_tokenizer_name(llama3) == "llama-bpe"
    assert pre_tokenizer_name({**byte_level, "add_prefix_space": True}) is None
    assert pre_tokenizer_name({"type": "Metaspace", "replacement": "\u2581"}) is None
    other = {"type": "Sequence", "pretokenizers": [{**llama3["pretokenizers"][0], "pattern": {"Regex": r"\s+"}},
                                                   llama3["pretokenizers"][1]]}
    assert pre_tokenizer_name(other) is None
