#!/usr/bin/env python3
"""Independent check of ftbench's forward pass, converter, adapters and merge against
Hugging Face `transformers` and `peft`.

What it does (all files go to a temporary folder; nothing is fetched from the network):

1. `ftbench convert` writes the GGUF model as an HF folder; `transformers` loads it
   (f32, eager attention) and must report no missing, unexpected or mismatched weights.
2. For a few texts (English, a GSM8K question and answer, code, accents and CJK) the
   per-token log-probabilities from `transformers` are compared with
   `ftbench score --json` on the GGUF file and on the converted folder. Token ids must be
   identical (the BOS is the first token and has no log-probability).
3. `ftbench train` makes a small LoRA adapter (2 steps of configs/quickstart.toml), which
   `peft.PeftModel.from_pretrained` loads onto the converted model: no warning, and every
   tensor of the adapter file must end up in the model unchanged (PEFT does not warn about
   keys that match no module, so this is checked separately). The adapter's log-probs are
   compared with `ftbench score --adapter`; then PEFT's `merge_and_unload()` with
   `ftbench export --merge` scored by ftbench, and the merged weights themselves.
4. Prints one JSON summary line; exits non-zero when token ids differ, a load is not
   clean, or a max |delta logprob| exceeds --tol.

Tolerance: both sides run the same f32 weights in f32 and differ only in the order of
floating-point sums (matmul blocking, reductions in RMSNorm and softmax) over 18 layers.
Logits of magnitude ~10-30 then differ by ~1e-5, and so do the log-probs (measured max
2e-5 over 209 tokens). The default 1e-3 leaves a margin of 50 for other BLAS builds and
thread counts, while any real difference in the model
(a wrong norm, RoPE base, scale, attention window, LoRA scaling or a missing projection)
moves log-probs by 1e-2 or far more.

Usage (with the venv made by scripts/peers/setup.sh):

    .venv-peers/bin/python scripts/reference/hf_transformers_check.py \
        [--gguf models/gemma-3-270m-q4_k_m.gguf] [--ftbench target/release/ftbench] \
        [--adapter RUN/adapter] [--tol 1e-3] [--threads 2] [--keep]

--adapter reuses an adapter instead of training one. The whole check takes about 4 minutes
on 2 CPU cores, 1.5 of them in `ftbench train`.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# Never reach the network: these must be set before transformers / huggingface_hub load.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It was a bright, cold day in April.",
    "gsm8k": (
        "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
        "clips in May. How many clips did Natalia sell altogether in April and May?\n"
        "Answer: Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    ),
    "code": (
        "def fib(n: int) -> int:\n"
        "    a, b = 0, 1\n"
        "    for _ in range(n):\n"
        "        a, b = b, a + b\n"
        "    return a  # {'key': [1, 2, 3]}\n"
    ),
    "accents_cjk": "Ångström, façade, jalapeño, Straße: café naïve. 日本語のテキスト、中文分词，한국어 문장입니다。",
}


class Check:
    """Collects failures; the script exits non-zero if there is any."""

    def __init__(self):
        self.failures = []

    def fail(self, what):
        self.failures.append(what)
        print(f"FAIL: {what}", flush=True)


def run(cmd, cwd=REPO, capture=True):
    t0 = time.time()
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=capture, text=True)
    if res.returncode != 0:
        err = (res.stderr or "").strip() if capture else ""
        sys.exit(f"command failed ({res.returncode}): {' '.join(map(str, cmd))}\n{err}")
    print(f"  [{time.time() - t0:5.1f} s] {' '.join(map(str, cmd[:3]))} ...", flush=True)
    return res.stdout if capture else ""


def ftbench_score(args, model, text, adapter=None):
    cmd = [args.ftbench, "score", "--model", model, "--threads", args.threads, "--text", text, "--json"]
    if adapter:
        cmd += ["--adapter", adapter]
    out = json.loads(run(cmd))
    ids = [t["id"] for t in out["tokens"]]
    lps = [t["logprob"] for t in out["tokens"]]
    if lps[0] is not None:
        raise SystemExit(f"ftbench score: the first token (BOS) has a log-prob: {out['tokens'][0]}")
    total = sum(lps[1:])
    if abs(total - out["total_logprob"]) > 1e-6 * max(1.0, abs(total)):
        raise SystemExit(f"ftbench score: total_logprob {out['total_logprob']} is not the sum {total}")
    return ids, lps[1:]


@torch.no_grad()
def hf_logprobs(model, ids):
    """Log-probability of each token after the first, from f32 logits, log-softmax in f64."""
    x = torch.tensor([ids], dtype=torch.long)
    logits = model(input_ids=x).logits[0, :-1].to(torch.float64)
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, x[0, 1:, None]).squeeze(1).tolist()


def diff_stats(a, b):
    d = [abs(x - y) for x, y in zip(a, b)]
    return max(d), sum(d) / len(d)


def compare(check, label, ref_ids, ref_lps, ids, lps, tol):
    """One comparison over all texts: ids must match exactly; returns max and mean |delta|."""
    all_d = []
    for name in TEXTS:
        if ids[name] != ref_ids[name]:
            check.fail(f"{label}: token ids differ on {name!r}:\n  reference {ref_ids[name]}\n  ftbench   {ids[name]}")
            continue
        all_d += [abs(x - y) for x, y in zip(ref_lps[name], lps[name])]
    if not all_d:
        return {"max_abs": None, "mean_abs": None}
    mx, mean = max(all_d), sum(all_d) / len(all_d)
    print(f"{label}: {len(all_d)} tokens, max |d logprob| {mx:.3e}, mean {mean:.3e}", flush=True)
    if mx > tol:
        check.fail(f"{label}: max |d logprob| {mx:.3e} > tolerance {tol:g}")
    return {"max_abs": mx, "mean_abs": mean, "tokens": len(all_d)}


def loadable(check, folder, transformers):
    """The folder itself when transformers accepts its config.json. Otherwise each field
    that transformers' strict config rejects only for being a float with an integer value
    (e.g. `query_pre_attn_scalar: 256.0` where an int is declared) is recorded as a failure
    and made an int in a copy: a folder of links to the same weights and tokenizer with a
    corrected config.json, so that the numbers are still measured. ftbench keeps reading
    the folder it wrote."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    fixed = []
    for _ in range(16):
        try:
            transformers.AutoConfig.for_model(**cfg) if fixed else transformers.AutoConfig.from_pretrained(str(folder))
            break
        except Exception as e:  # huggingface_hub's StrictDataclassFieldValidationError
            m = re.search(r"field '(\w+)'.*expected int, got float", str(e), re.S)
            if not m or not isinstance(cfg.get(m.group(1)), float) or not cfg[m.group(1)].is_integer():
                raise
            key = m.group(1)
            check.fail(f"{folder}/config.json: transformers rejects {key}={cfg[key]!r} (declared int); "
                       f"loaded through a copy with {key}={int(cfg[key])}")
            cfg[key] = int(cfg[key])
            fixed.append(key)
    if not fixed:
        return folder
    copy = folder.parent / (folder.name + "-config-fixed")
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    for f in folder.iterdir():
        if f.name != "config.json":
            (copy / f.name).symlink_to(f.resolve())
    (copy / "config.json").write_text(json.dumps(cfg, indent=2))
    return copy


def load_hf(check, folder, transformers):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        check.fail(f"transformers loading {folder}: {bad}")
    return model.eval()


def train_adapter(args, work):
    out_dir = work / "results"
    run(
        [
            args.ftbench, "train", "--config", "configs/quickstart.toml",
            "--set", f"train.steps={args.steps}",
            "--set", "eval.gsm8k_examples=0",
            "--set", "data.max_eval_examples=4",
            "--set", "data.max_train_examples=16",
            "--set", f"model.threads={args.threads}",
            "--set", f"output.dir={out_dir}",
        ],
        capture=False,
    )
    runs = sorted(p for p in out_dir.iterdir() if (p / "adapter" / "adapter_config.json").is_file())
    if len(runs) != 1:
        sys.exit(f"expected one run with an adapter under {out_dir}, found {runs}")
    return runs[0] / "adapter"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=os.environ.get("FTBENCH_GEMMA3_GGUF", str(REPO / "models" / "gemma-3-270m-q4_k_m.gguf")))
    ap.add_argument("--ftbench", default=str(REPO / "target" / "release" / "ftbench"))
    ap.add_argument("--adapter", help="an existing PEFT adapter folder for this model (skips training)")
    ap.add_argument("--steps", type=int, default=2, help="training steps for the adapter")
    ap.add_argument("--tol", type=float, default=1e-3, help="max |delta logprob| allowed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", help="folder for converted models and the run (default: a new temporary one); "
                    "its gemma3-hf*/ and merged*/ are replaced")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    for p in (args.gguf, args.ftbench):
        if not Path(p).is_file():
            sys.exit(f"{p}: not found")

    import transformers
    import peft
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_warning()
    check = Check()
    made_tmp = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ftbench-hf-check-"))
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("gemma3-hf", "gemma3-hf-config-fixed", "merged", "merged-config-fixed"):
        shutil.rmtree(work / sub, ignore_errors=True)
    print(f"work folder: {work}\ntorch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}", flush=True)
    summary = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
               "gguf": Path(args.gguf).name, "tol": args.tol, "texts": list(TEXTS)}
    try:
        # 1. Convert and load with transformers.
        hf_dir = work / "gemma3-hf"
        run([args.ftbench, "convert", "--model", args.gguf, "--out", hf_dir])
        hf_load_dir = loadable(check, hf_dir, transformers)
        tok = transformers.AutoTokenizer.from_pretrained(str(hf_load_dir))
        model = load_hf(check, hf_load_dir, transformers)

        # 2. Base model: transformers vs ftbench on the GGUF and on the converted folder.
        hf_ids, hf_base, gg_ids, gg_base, fo_ids, fo_base = {}, {}, {}, {}, {}, {}
        for name, text in TEXTS.items():
            hf_ids[name] = tok(text)["input_ids"]
            if hf_ids[name][0] != tok.bos_token_id:
                check.fail(f"transformers tokenizer: no BOS first on {name!r}: {hf_ids[name][:4]}")
            hf_base[name] = hf_logprobs(model, hf_ids[name])
            gg_ids[name], gg_base[name] = ftbench_score(args, args.gguf, text)
            fo_ids[name], fo_base[name] = ftbench_score(args, hf_dir, text)
        summary["tokens_per_text"] = {n: len(v) for n, v in hf_ids.items()}
        summary["base_gguf"] = compare(check, "base: transformers vs ftbench(gguf)", hf_ids, hf_base, gg_ids, gg_base, args.tol)
        summary["base_hf_folder"] = compare(check, "base: transformers vs ftbench(hf folder)", hf_ids, hf_base, fo_ids, fo_base, args.tol)

        # 3. Adapter: PEFT vs ftbench.
        adapter = Path(args.adapter) if args.adapter else train_adapter(args, work)
        summary["adapter"] = str(adapter)
        file_sd = load_file(str(adapter / "adapter_model.safetensors"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm = peft.PeftModel.from_pretrained(model, str(adapter))
        for w in caught:
            msg = str(w.message)
            print(f"warning while loading the adapter: {w.category.__name__}: {msg}", flush=True)
            if any(w in msg.lower() for w in ("missing", "unexpected", "key", "mismatch", "target", "ignor")):
                check.fail(f"peft load warning: {msg}")
        pm.eval()
        # PEFT silently ignores adapter keys that match no module; compare both ways.
        loaded = peft.get_peft_model_state_dict(pm, save_embedding_layers=False)
        missing = sorted(set(loaded) - set(file_sd))
        unexpected = sorted(set(file_sd) - set(loaded))
        if missing or unexpected:
            check.fail(f"peft load: missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
        changed = [k for k in set(loaded) & set(file_sd) if not torch.equal(loaded[k], file_sd[k].to(loaded[k].dtype))]
        if changed:
            check.fail(f"peft load: {len(changed)} tensors differ from the file, e.g. {changed[:3]}")
        nonzero_b = sum(1 for k, v in file_sd.items() if "lora_B" in k and v.abs().max() > 0)
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        summary["adapter_tensors"] = len(file_sd)
        summary["adapter_nonzero_B"] = nonzero_b
        summary["adapter_config"] = {k: cfg.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules")}

        hf_ad, ft_ad, ft_ad_ids = {}, {}, {}
        for name, text in TEXTS.items():
            hf_ad[name] = hf_logprobs(pm, hf_ids[name])
            ft_ad_ids[name], ft_ad[name] = ftbench_score(args, args.gguf, text, adapter=adapter)
        effect = max(max(abs(a - b) for a, b in zip(hf_ad[n], hf_base[n])) for n in TEXTS)
        print(f"adapter effect: max |d logprob| base vs adapter (transformers+peft) {effect:.3e}", flush=True)
        summary["adapter_effect_max_abs"] = effect
        if effect < 100 * args.tol:
            check.fail(f"the adapter changes log-probs by only {effect:.3e}: the comparison says little")
        summary["adapter_gguf"] = compare(check, "adapter: peft vs ftbench(gguf + adapter)", hf_ids, hf_ad, ft_ad_ids, ft_ad, args.tol)

        # Merge: PEFT's merge_and_unload vs ftbench export --merge.
        merged_dir = work / "merged"
        run([args.ftbench, "export", "--model", args.gguf, "--adapter", adapter, "--threads", args.threads,
             "--merge", "--out", merged_dir])
        merged = pm.merge_and_unload().eval()
        hf_mg, ft_mg, ft_mg_ids = {}, {}, {}
        for name, text in TEXTS.items():
            hf_mg[name] = hf_logprobs(merged, hf_ids[name])
            ft_mg_ids[name], ft_mg[name] = ftbench_score(args, merged_dir, text)
        summary["merged_peft_vs_unmerged_peft"] = compare(check, "merged: peft merged vs peft unmerged", hf_ids, hf_ad, hf_ids, hf_mg, args.tol)
        summary["merged"] = compare(check, "merged: peft merge_and_unload vs ftbench(export --merge)", hf_ids, hf_mg, ft_mg_ids, ft_mg, args.tol)

        # The merged weights themselves, tensor by tensor.
        ours = load_hf(check, loadable(check, merged_dir, transformers), transformers)
        theirs_sd, ours_sd = merged.state_dict(), ours.state_dict()
        if set(theirs_sd) != set(ours_sd):
            check.fail(f"merged state dicts differ in keys: {sorted(set(theirs_sd) ^ set(ours_sd))[:5]}")
        wmax, wname = 0.0, None
        for k in set(theirs_sd) & set(ours_sd):
            d = (theirs_sd[k] - ours_sd[k]).abs().max().item()
            if d > wmax:
                wmax, wname = d, k
        print(f"merged weights: max |d| peft vs ftbench {wmax:.3e}" + (f" ({wname})" if wname else ""), flush=True)
        summary["merged_weights_max_abs"] = wmax
        # Not vacuous: the merged projections must differ from the converted base weights.
        moved = 0
        with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as base_st:
            for k in base_st.keys():
                if k in ours_sd and k.endswith("proj.weight") and not torch.equal(base_st.get_tensor(k), ours_sd[k]):
                    moved += 1
        print(f"merged weights: {moved} projections differ from the base", flush=True)
        summary["merged_projections_changed"] = moved
        if moved != nonzero_b:
            check.fail(f"{moved} merged projections differ from the base; the adapter has {nonzero_b} non-zero B")
        # W + s*B@A in f32: a few ulps of |W| (~0.1) is ~1e-8; anything near 1e-5 is a wrong merge.
        if wmax > 1e-5:
            check.fail(f"merged weights differ by {wmax:.3e} in {wname}")
    finally:
        if made_tmp and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary["ok"] = not check.failures
    summary["failures"] = check.failures
    print(json.dumps(summary, ensure_ascii=False))
    sys.exit(1 if check.failures else 0)


if __name__ == "__main__":
    main()
