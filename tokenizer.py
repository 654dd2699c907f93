"""Tokenizers for the supported models, behind one small class.

Three kinds, picked by `load_tokenizer` from the files in a checkpoint folder:
  - SentencePiece `tokenizer.model` (Llama-2, Mistral): a protobuf file, run by `sentencepiece`;
  - tiktoken `tokenizer.model` (Llama-3): base64-token + rank lines, plus Meta's special tokens;
  - byte-level BPE `tokenizer.json` (GPT-2 style: SmolLM2; also Llama-3 as Hugging Face ships it),
    turned into a `tiktoken.Encoding` so that encoding is fast.
`write_gguf_tokenizer` writes the last kind from a GGUF file's metadata, so that a checkpoint converted
from GGUF carries its tokenizer as plain Hugging Face files.
"""
import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import regex  # a tiktoken dependency, with the regex dialect of tiktoken's patterns
import sentencepiece as spm
import tiktoken

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2's tokenizer.json (and llama.cpp's pre type "smollm") isolates every digit, then splits the text
# between digits with GPT2_PATTERN. One regex does both: each \p{N} is a piece of its own, and a
# whitespace run just before a digit ends as at the end of a text (the lookahead lets a digit follow).
# transformers' GGUF loader ignores tokenizer.ggml.pre and builds plain GPT-2 splitting, which differs
# only there: "a  1" is [a, " ", " 1"] there and [a, "  ", "1"] here.
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|\p{N}| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
RESERVED = [f"<|reserved_special_token_{i}|>" for i in range(251)]
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", *RESERVED[:4], "<|start_header_id|>",
                  "<|end_header_id|>", RESERVED[4], "<|eot_id|>", *RESERVED[5:]]  # 256, ids after the ranks
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>")  # stop ids besides EOS
BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
DIGITS = {"type": "Digits", "individual_digits": True}


def byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for chr(256 + n)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


@dataclass(repr=False)  # the vocabulary tables would flood any traceback
class Tokenizer:
    special: dict[str, int]  # special-token text -> id; matched in text only with allow_special
    bos_id: int | None
    eos_id: int
    chat_format: str | None  # "llama2", "llama3", "chatml" or None
    add_bos: bool  # whether the model expects BOS in front of a prompt
    vocab_size: int
    sp: spm.SentencePieceProcessor | None = None
    enc: tiktoken.Encoding | None = None  # the two tiktoken kinds: token ids are tiktoken ranks
    pieces: list[bytes] = field(default_factory=list)  # tiktoken kinds: id -> bytes
    pattern: str = ""  # tiktoken kinds: the pre-tokenizer regex
    absent: bytes = b""  # the single bytes without a token (see _encode_plain)
    default_system: str | None = None  # the system prompt the chat template uses when none is given
    stop_ids: set[int] = field(init=False)

    def __post_init__(self):
        if self.add_bos and self.bos_id is None:
            raise ValueError("the tokenizer files ask for a BOS token (add_bos_token) but name none")
        self.stop_ids = {self.eos_id} | {self.special[t] for t in END_OF_TURN if t in self.special}
        names = sorted(self.special, key=len, reverse=True)  # longest first: no prefix shadows a token
        self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str, bos: bool = False, allow_special: bool = False) -> list[int]:
        if bos and self.bos_id is None:
            raise ValueError("this tokenizer has no BOS token; call encode with bos=False")
        ids = [self.bos_id] if bos else []
        parts = self._special_re.split(text) if allow_special and self._special_re else [text]
        for i, part in enumerate(parts):  # split() with a group: the odd entries are special tokens
            ids += [self.special[part]] if i % 2 else self._encode_plain(part) if part else []
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if self.sp is not None:
            return self.sp.encode(text)
        data = text.encode("utf-8", "replace")
        if len(data.translate(None, self.absent)) == len(data):
            return self.enc.encode_ordinary(text)
        # A byte without a token (SmolLM2 lacks 21: control characters such as U+0004 and U+0013, the
        # lead bytes 0xF1/0xF2 of planes 4-11, bytes never in UTF-8) is dropped inside its pre-token
        # before merging, exactly as Hugging Face tokenizers does for a BPE with neither unk_token nor
        # byte fallback (SmolLM2's published tokenizer.json too); tiktoken itself would panic. The
        # alternative, the GGUF's unknown token, is <|endoftext|>: it would end the document.
        # tiktoken has no public bytes-level encode, hence its _encode_single_piece.
        pieces = (p.encode("utf-8", "replace").translate(None, self.absent)
                  for p in regex.findall(self.pattern, text))
        return [i for p in pieces if p for i in self.enc._encode_single_piece(p)]

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        if self.sp is not None:
            return self.sp.decode(ids)
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", "replace")

    def encode_prompt(self, text: str, chat: bool = False, system: str | None = None) -> list[int]:
        """The ids to feed the model: BOS if it expects one and, with chat=True, one user turn in its chat
        format, ending where the assistant's reply begins."""
        ids = [self.bos_id] if self.add_bos else []
        if not chat:
            return ids + self.encode(text)
        s, enc = self.special, self.encode
        if self.chat_format == "llama2":  # Meta's format: the <<SYS>> block opens the first user turn
            if system is not None:
                text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
            return ids + enc(f"[INST] {text.strip()} [/INST]")
        if self.chat_format == "llama3":
            turns = [("system", system)] if system is not None else []
            for role, content in turns + [("user", text), ("assistant", None)]:
                ids += [s["<|start_header_id|>"], *enc(role), s["<|end_header_id|>"]]
                ids += enc("\n\n") if content is None else enc("\n\n" + content.strip()) + [s["<|eot_id|>"]]
            return ids
        if self.chat_format == "chatml":
            system = self.default_system if system is None else system
            turns = [("system", system)] if system is not None else []
            for role, content in turns + [("user", text)]:
                ids += [s["<|im_start|>"], *enc(f"{role}\n{content}"), s["<|im_end|>"], *enc("\n")]
            return ids + [s["<|im_start|>"], *enc("assistant\n")]
        raise ValueError("this tokenizer has no known chat format; encode the prompt with chat=False")


def load_tokenizer(checkpoint_dir) -> Tokenizer:
    """The tokenizer of a checkpoint folder: tokenizer.model (SentencePiece or tiktoken) if present,
    else tokenizer.json + tokenizer_config.json (byte-level BPE)."""
    d = Path(checkpoint_dir)
    if (d / "tokenizer.model").is_file():
        return _load_tokenizer_model(d / "tokenizer.model")
    if (d / "tokenizer.json").is_file():
        return _load_tokenizer_json(d)
    raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {d}: convert the checkpoint with "
                            "convert_hf_checkpoint.py, or copy the model's tokenizer files there")


def _load_tokenizer_model(path: Path) -> Tokenizer:
    data = path.read_bytes()
    try:  # tiktoken format: one "base64-token rank" line per token
        ranks = {base64.b64decode(t, validate=True): int(r) for t, r in map(bytes.split, data.splitlines())}
    except ValueError:  # also binascii.Error, and lines that are not two fields
        ranks = {}
    if ranks:
        dense = sorted(ranks.values()) == list(range(len(ranks)))
        if not dense or any(bytes([b]) not in ranks for b in range(256)):
            raise ValueError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1} over all 256 bytes; "
                             "the file is corrupt")
        special = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL)}
        enc = tiktoken.Encoding(path.parent.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                special_tokens=special)
        pieces = sorted(ranks, key=ranks.get) + [name.encode() for name in LLAMA3_SPECIAL]
        return Tokenizer(special, special["<|begin_of_text|>"], special["<|end_of_text|>"], "llama3", True,
                         len(pieces), enc=enc, pieces=pieces, pattern=LLAMA3_PATTERN)
    sp = spm.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(data)
    except RuntimeError:
        pass  # reported below, as is an empty model
    n = sp.get_piece_size()
    if n == 0:
        raise ValueError(f"{path} is neither a SentencePiece model nor a tiktoken BPE file; "
                         "re-copy it from the model's original files")
    special = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i)}
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    return Tokenizer(special, bos, sp.eos_id(), "llama2", bos is not None, n, sp=sp)


def _split_pattern(pre: dict | None) -> str | None:
    """The one regex that splits text as this tokenizer.json pre_tokenizer does, if it is one we know."""
    steps = pre["pretokenizers"] if pre and pre.get("type") == "Sequence" else [pre]
    if steps == [BYTELEVEL]:
        return GPT2_PATTERN
    if steps == [DIGITS, BYTELEVEL]:
        return SMOLLM_PATTERN
    if (len(steps) == 2 and steps[1] == {**BYTELEVEL, "use_regex": False} and steps[0]["type"] == "Split"
            and steps[0]["behavior"] == "Isolated" and not steps[0]["invert"]):  # Llama-3's tokenizer.json
        return steps[0]["pattern"].get("Regex")
    return None


def _load_tokenizer_json(d: Path) -> Tokenizer:
    to_byte = {c: b for b, c in byte_to_char().items()}
    try:
        tj = json.loads((d / "tokenizer.json").read_text())
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        model, pattern = tj["model"], _split_pattern(tj["pre_tokenizer"])
        added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        vocab = model["vocab"]
        merged = [vocab["".join(m.split(" ") if isinstance(m, str) else m)] for m in model["merges"]]
        ids = {**vocab, **added}
        pieces = [b""] * (max(ids.values()) + 1)
        for tok, i in ids.items():
            pieces[i] = tok.encode() if tok in added else bytes(to_byte[c] for c in tok)
        # a token is written either as its text or as {"content": text, ...}
        names = {k: v["content"] if isinstance(v, dict) else v
                 for k in ("bos_token", "eos_token") if (v := cfg.get(k))}
        bos, eos = (ids[names[k]] if k in names else None for k in ("bos_token", "eos_token"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{d}: unreadable or incomplete tokenizer.json / tokenizer_config.json ({e!r}); "
                         "re-run convert_hf_checkpoint.py or re-copy the model's tokenizer files") from e
    if model.get("type") != "BPE" or pattern is None or model.get("byte_fallback") or model.get("unk_token"):
        raise ValueError(f"{d / 'tokenizer.json'}: only GPT-2 style byte-level BPE is supported "
                         f"(model {model.get('type')}, pre_tokenizer {tj['pre_tokenizer']})")
    if eos is None:
        raise ValueError(f"{d / 'tokenizer_config.json'} names no eos_token")
    # tiktoken's ids are its ranks, and it merges the adjacent pair whose concatenation has the lowest
    # rank: that is merge order only if the merged tokens' ids increase along the merges list (so they do
    # for SmolLM2: ids 252.. in merge order). Only single bytes and merge results can ever come out.
    # (tiktoken may join a pair other than a token's listed merge; for vocabularies trained by merging
    # that gives the same result, which the tests check against Hugging Face on real text.)
    if any(x >= y for x, y in zip(merged, merged[1:])):
        raise ValueError(f"{d / 'tokenizer.json'}: token ids do not follow merge order; unsupported")
    ranks = {pieces[i]: i for i in merged} | {bytes([b]): vocab[c] for c, b in to_byte.items() if c in vocab}
    enc = tiktoken.Encoding(d.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)
    template = cfg.get("chat_template") or ""
    chat_format = ("llama3" if "<|start_header_id|>" in added else
                   "chatml" if "<|im_start|>" in added else None)
    system = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<]*)<\|im_end\|>", template)
    # add_bos_token if given, else whether the post-processor (as Llama-3's does) puts BOS in front
    post_processor = json.dumps(tj.get("post_processor"))
    add_bos = cfg.get("add_bos_token", bos is not None and json.dumps(names["bos_token"]) in post_processor)
    return Tokenizer(added, bos, eos, chat_format, bool(add_bos), len(pieces), enc=enc, pieces=pieces,
                     pattern=pattern, absent=bytes(b for c, b in to_byte.items() if c not in vocab),
                     default_system=system[1] if system else None)


def write_gguf_tokenizer(reader, out_dir: Path) -> None:
    """Writes tokenizer.json + tokenizer_config.json (Hugging Face format) from the metadata of a GGUF
    file with a byte-level BPE ("gpt2") tokenizer; `reader` is a gguf.GGUFReader."""
    f = {k: v.contents() for k, v in reader.fields.items() if k.startswith("tokenizer.")}
    kind, pre = f.get("tokenizer.ggml.model"), f.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in ("smollm", "gpt2", "default"):
        raise ValueError(f"GGUF tokenizer model {kind!r} with pre-tokenizer {pre!r} is not supported "
                         "(only byte-level BPE 'gpt2' with pre 'smollm', 'gpt2' or 'default')")
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == 3}  # GGUF token types: 3 control, 4 user-defined
             for i, t in enumerate(tokens) if types[i] in (3, 4)]
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [DIGITS, BYTELEVEL]} if pre == "smollm"
        else BYTELEVEL,
        "post_processor": None, "decoder": {**BYTELEVEL, "add_prefix_space": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in f["tokenizer.ggml.merges"]]},
    }
    token = lambda key: tokens[f[key]] if key in f else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("tokenizer.ggml.bos_token_id"),
              "eos_token": token("tokenizer.ggml.eos_token_id"),
              "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token")),
              "chat_template": f.get("tokenizer.chat_template")}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
