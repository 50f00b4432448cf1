#!/usr/bin/env python3
"""Golden token ids for ftbench's SentencePiece tokenizer, from the `sentencepiece` library.

The vocabulary embedded in a GGUF file (tokenizer.ggml.model = "llama") is turned back into
a SentencePiece BPE model (sentencepiece's own protobuf, `sentencepiece_model_pb2`), and a
fixed list of strings is encoded with `sentencepiece` itself. The strings and ids are written
as a JSON fixture that `crates/trainer/tests/tokenizer.rs` compares against.

Three documented adjustments turn the GGUF vocabulary into the model SentencePiece expects:

1. The token named by `tokenizer.ggml.unknown_token_id` becomes the UNKNOWN piece (GGUF files
   often store it as a control token; SentencePiece needs exactly one UNKNOWN piece).
2. In user-defined tokens, spaces become U+2581 again. GGUF converters write user-defined
   tokens with their "▁" already replaced by spaces; SentencePiece matches user-defined
   pieces in the normalized text, where every space is already "▁".
3. Control tokens (e.g. `<start_of_turn>`) are marked USER_DEFINED. ftbench, like Hugging Face
   `tokenizers`, recognises special tokens written in the text; SentencePiece does that for
   user-defined pieces only (matched whole, never merged with their neighbours).

Usage (needs the packages `gguf`, `sentencepiece` and `protobuf`):

    python scripts/reference/spm_golden.py [--gguf PATH] [--out JSON] [--save-model PATH]

For a wider check than the committed fixture, `--corpus FILE...` encodes the paragraphs
of text files (a .jsonl file contributes the string values of each row) and `--random N`
adds N seeded random strings (vocabulary pieces glued together, runs of spaces and
newlines, characters outside the vocabulary) instead of the fixed list; write those to
another file and point the Rust test at it with FTBENCH_SPM_GOLDEN_EXTRA.
"""

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path

import gguf
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
DEFAULT_GGUF = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
DEFAULT_OUT = REPO / "crates" / "trainer" / "tests" / "data" / "gemma3_spm_golden.json"

RUST_SNIPPET = """fn main() {
\tlet xs: Vec<u32> = (0..10).map(|x| x * x).collect();
\tif xs.len() > 3 {
\t\tprintln!("{:?} -> {}", &xs[..3], xs.iter().sum::<u32>());
\t}
}
"""

PYTHON_SNIPPET = """def fib(n: int) -> int:
    \"\"\"Return the n-th Fibonacci number.\"\"\"
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a  # {'key': [1, 2, 3]}
"""

STRINGS = [
    # plain text
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "",
    "a",
    # accents and other Latin scripts
    "café naïve Ærø",
    "Ångström, façade, jalapeño, Straße, œuvre, Dvořák",
    "ÉCOLE élève",
    # combining marks (NFD) stay as they are: no normalization
    "cafe\u0301 nai\u0308ve",
    # CJK, Korean, other scripts
    "日本語のテキスト",
    "中文分词",
    "한국어 문장입니다",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया",
    # emoji: single, skin tone, ZWJ sequences, flags, keycap
    "I love 🍕 and 🚀!",
    "👍🏽 👨\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈 👩🏾\u200d💻",
    "🇫🇷🇯🇵🇺🇸 flags",
    "1️⃣ #️⃣",
    # code with tabs and braces
    RUST_SNIPPET,
    PYTHON_SNIPPET,
    "{\"a\": [1, 2, {\"b\": null}], \"c\": \"d\"}",
    "x<y && y>=z || !w; a->b; c::d<e<f>>();",
    # runs of spaces, leading and trailing spaces
    "a  b   c    d",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "  both  ",
    " ",
    "     ",
    "tab\tseparated\t\tvalues",
    # newlines and runs of newlines
    "line one\nline two",
    "para one\n\npara two\n\n\n\npara three",
    "\n",
    "\n\n\n",
    "ends with newline\n",
    "windows\r\nline endings\r\n",
    " \n \n  \n",
    # digits
    "0123456789",
    "3.14159 2,718 1e-10 -42 +7 100000000",
    "Natalia sold 48/2 = 24 clips in May. 48+24 = 72 #### 72",
    # special tokens written in the text
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>",
    "text<start_of_turn>glued<end_of_turn>text",
    "<start_of_turn><start_of_turn>",
    "a <bos> b <eos> c <pad>",
    # user-defined tokens (HTML tags) and look-alikes
    "<table><tr><td>1</td></tr></table> <b>bold</b> <notatag>",
    # byte fallback: characters missing from the vocabulary
    "\u0001\u0002\u001f",
    "\ue000\uf8ff private use",
    "\U0010fffd \U000e0001",
    "rare: \U0002a6d6 \U0001d11e \u2fd5",
    # mixed
    "Mixed: English, Français, 日本語, 🍕, and code `let x = 1;`",
    "▁ literal lower one eighth block ▁▁",
    "\u00a0non-breaking\u00a0space and \u3000ideographic space",
]

# SentencePiece piece types share their numbering with GGUF's token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def build_model(gguf_path):
    reader = gguf.GGUFReader(gguf_path)
    model = field(reader, "tokenizer.ggml.model")
    if model != "llama":
        sys.exit(f"{gguf_path}: tokenizer.ggml.model is {model!r}, expected 'llama'")
    tokens = field(reader, "tokenizer.ggml.tokens")
    scores = field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    unk_id = field(reader, "tokenizer.ggml.unknown_token_id")
    add_space_prefix = field(reader, "tokenizer.ggml.add_space_prefix")
    if add_space_prefix is None:
        add_space_prefix = True
    if not (len(tokens) == len(scores) == len(types)):
        sys.exit(f"{gguf_path}: tokens/scores/token_type lengths differ")

    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = any(t == BYTE for t in types)
    m.trainer_spec.unk_id = unk_id
    m.trainer_spec.bos_id = -1
    m.trainer_spec.eos_id = -1
    m.trainer_spec.pad_id = -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(add_space_prefix)
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for i, (tok, score, typ) in enumerate(zip(tokens, scores, types)):
        p = m.pieces.add()
        if i == unk_id:
            typ = UNKNOWN
        elif typ == USER_DEFINED:
            tok = tok.replace(" ", "\u2581")
        elif typ == CONTROL:
            typ = USER_DEFINED
        p.piece = tok
        p.score = float(score)
        p.type = typ
    vocab_sha = hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()
    return m, len(tokens), vocab_sha


def corpus_strings(paths):
    """Paragraphs of text files; the string values of each row of a .jsonl file."""
    out = []
    for path in paths:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if path.endswith(".jsonl"):
            for line in text.splitlines():
                if line.strip():
                    row = json.loads(line)
                    out.extend(v for v in row.values() if isinstance(v, str))
        else:
            out.extend(p for p in text.split("\n\n") if p)
    return out


def random_strings(n, seed, pieces):
    """Seeded strings made to reach corners of the algorithm: vocabulary pieces glued
    together (so merges compete across piece boundaries), whitespace runs, special
    tokens, and characters the vocabulary lacks."""
    rng = random.Random(seed)
    fillers = [" ", "  ", "   ", "\n", "\n\n", "\t", "", "", "", "<start_of_turn>", "<b>"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.6:
                parts.append(rng.choice(pieces).replace("\u2581", " "))
            elif r < 0.85:
                parts.append(rng.choice(fillers))
            else:
                parts.append(chr(rng.choice([rng.randint(0x20, 0x2FF), rng.randint(0x3000, 0x9FFF),
                                             rng.randint(0x1F300, 0x1FAFF), rng.randint(0xE000, 0xF8FF),
                                             rng.randint(0x20000, 0x2A6DF)])))
        out.append("".join(parts))
    return out


def dump(out):
    """JSON with one line per case, so that diffs of the fixture stay readable."""
    head = {k: v for k, v in out.items() if k != "cases"}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},")
    lines.append(' "cases": [')
    cases = [" " + json.dumps(c, ensure_ascii=False) for c in out["cases"]]
    lines.append(",\n".join(cases))
    lines.append(" ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_gguf = os.environ.get("FTBENCH_GEMMA3_GGUF", str(DEFAULT_GGUF))
    ap.add_argument("--gguf", default=default_gguf)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--save-model", help="also write the SentencePiece .model file here")
    ap.add_argument("--corpus", nargs="+", help="encode the paragraphs of these files instead")
    ap.add_argument("--random", type=int, default=0, help="encode this many random strings instead")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    proto, vocab_size, vocab_sha = build_model(args.gguf)
    data = proto.SerializeToString()
    if args.save_model:
        Path(args.save_model).write_bytes(data)
    sp = spm.SentencePieceProcessor(model_proto=data)

    strings = STRINGS
    if args.corpus or args.random:
        strings = corpus_strings(args.corpus or [])
        normal = [p.piece for p in proto.pieces if p.type == NORMAL]
        strings += random_strings(args.random, args.seed, normal)
        # ftbench matches the unknown token written in the text (as HF tokenizers does);
        # SentencePiece cannot be told to, so such strings are left out here.
        unk = proto.pieces[proto.trainer_spec.unk_id].piece
        strings = [s for s in strings if unk not in s]
    cases = []
    for s in strings:
        ids = sp.encode(s, out_type=int)
        cases.append({"text": s, "ids": ids})
    out = {
        "note": "ids from the sentencepiece library on a BPE model rebuilt from the GGUF "
        "vocabulary by scripts/reference/spm_golden.py; no BOS",
        "sentencepiece_version": spm.__version__,
        "gguf_file": Path(args.gguf).name,
        "vocab_size": vocab_size,
        "vocab_sha256": vocab_sha,
        "cases": cases,
    }
    Path(args.out).write_text(dump(out), encoding="utf-8")
    print(f"wrote {len(cases)} cases to {args.out} (sentencepiece {spm.__version__})")


if __name__ == "__main__":
    main()
