#!/usr/bin/env python3
"""Checks a tokenizer.json written by ftbench's `Tokenizer::save_hf` with Hugging Face's own
libraries: it must load and encode the golden strings to the golden ids.

Produce the folder with the Rust test (it keeps the files when FTBENCH_TOKENIZER_OUT is set):

    FTBENCH_TOKENIZER_OUT=/tmp/gemma3-hf FTBENCH_GEMMA3_GGUF=models/gemma-3-270m-q4_k_m.gguf \
        cargo test -p ftbench-trainer --test tokenizer gemma3_saved
    python scripts/reference/hf_check.py /tmp/gemma3-hf [GOLDEN_JSON]

GOLDEN_JSON defaults to the committed fixture; a larger one comes from
`spm_golden.py --corpus/--random`.

Needs the package `tokenizers`; `transformers` is used too when it is installed. Exits
non-zero on the first disagreement.
"""

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer
import tokenizers

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "crates" / "trainer" / "tests" / "data" / "gemma3_spm_golden.json"


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    folder = Path(sys.argv[1])
    golden_path = Path(sys.argv[2]) if len(sys.argv) == 3 else GOLDEN
    golden = json.loads(golden_path.read_text(encoding="utf-8"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = tok.token_to_id(config["bos_token"]) if config.get("bos_token") else None

    failures = 0
    for case in golden["cases"]:
        text, ids = case["text"], case["ids"]
        got = tok.encode(text, add_special_tokens=False).ids
        if got != ids:
            failures += 1
            print(f"tokenizers {tokenizers.__version__}: {text!r}\n  expected {ids}\n  found    {got}")
        back = tok.decode(ids, skip_special_tokens=False)
        # A literal U+2581 comes back as a space: SentencePiece writes spaces that way.
        if back != text.replace("\u2581", " "):
            failures += 1
            print(f"tokenizers decode: {ids}\n  expected {text!r}\n  found    {back!r}")
        with_bos = tok.encode(text).ids
        expected = ([bos] if config.get("add_bos_token") and bos is not None else []) + ids
        if with_bos != expected:
            failures += 1
            print(f"tokenizers with special tokens: {text!r}\n  expected {expected}\n  found    {with_bos}")
    print(f"tokenizers {tokenizers.__version__}: {len(golden['cases'])} cases checked")

    try:
        import transformers
        from transformers import AutoTokenizer
    except ImportError:
        print("transformers not installed: skipped")
    else:
        hf = AutoTokenizer.from_pretrained(str(folder))
        for case in golden["cases"]:
            text, ids = case["text"], case["ids"]
            got = hf(text, add_special_tokens=False)["input_ids"]
            if got != ids:
                failures += 1
                print(f"transformers {transformers.__version__}: {text!r}\n  expected {ids}\n  found    {got}")
            got = hf(text)["input_ids"]
            expected = ([hf.bos_token_id] if config.get("add_bos_token") else []) + ids
            if got != expected:
                failures += 1
                print(f"transformers with special tokens: {text!r}\n  expected {expected}\n  found    {got}")
        print(f"transformers {transformers.__version__}: {len(golden['cases'])} cases checked")

    if failures:
        sys.exit(f"{failures} disagreements")
    print("all agree")


if __name__ == "__main__":
    main()
