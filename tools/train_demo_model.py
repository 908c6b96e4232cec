"""Train sluice's built-in demo model from scratch, offline, on a CPU: `python tools/train_demo_model.py`.

    CPython docs ──► demo_corpus ──► train docs (+ ChatML copies of some) ──► byte-level BPE
      (pydoc_data topics,              └─ held-out docs (~2%, by hash) ──► heldout.txt, val loss
       stdlib docstrings)
    tokens ──► packed [seq_len + 1] windows, EOS between documents ──► LlamaForCausalLM (HF class
    as the network, our loop: AdamW, warmup + cosine, grad clipping, bf16 autocast, val loss)
    ──► save_pretrained (bf16 safetensors) + tokenizer + chat template + README.md + LICENSE-DATA.txt

Time: the default 1000 steps (2M tokens) take about 20 minutes on one idle core of a current
x86 server CPU (~1.2 s/step with bf16 autocast, ~2 s/step without), plus ~1 minute for the
corpus, tokenizer, saving and samples. `--minutes` (default 60) is a wall-clock cap for busy
machines: when the clock runs ahead of the steps, the LR schedule follows the clock so that the
run still ends annealed at the cap (the model card then says so); `--steps 0` instead fits the
step count to `--minutes` after timing a few steps.

Everything is seeded and single-process; with the same CPython (the corpus is its docs), torch
and `--threads`, a run of the same `--steps` that is not cut by the cap reproduces the same
weights (the corpus digest is printed and recorded to check the first part).

The output directory is written to `<out>.partial` and swapped in at the end, so an interrupted
run never leaves a half-written model where sluice looks for it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_corpus  # tools/ is not a package: imported from the script's directory

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "sluice" / "assets" / "demo_model"
HELDOUT_CHARS = 8000
"""heldout.txt gets whole held-out documents until it reaches this many characters."""

MODEL_SHAPE = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
               "num_attention_heads": 6, "num_key_value_heads": 2,
               "max_position_embeddings": 1024, "tie_word_embeddings": True,
               "rms_norm_eps": 1e-6, "initializer_range": 0.02}
"""~11.0M parameters with a 4096-token vocabulary: 22 MB in bf16."""

QUESTIONS = ("What does {name} do?", "Explain {name}.", "How do I use {name}?",
             "Tell me about {name}.", "What is {name} in Python?")
SAMPLE_PROMPTS = ("The json module", "Return a list of", "This function is used to",
                  "The with statement")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model directory to write")
    p.add_argument("--steps", type=int, default=1000,
                   help="optimizer steps; 0 = fit to --minutes after timing a few steps")
    p.add_argument("--minutes", type=float, default=60.0,
                   help="wall-clock cap for training: the LR schedule anneals by then at the "
                        "latest, and the run stops there")
    p.add_argument("--threads", type=int, default=1, help="torch and tokenizer threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--chat-fraction", type=int, default=3,
                   help="one in this many object/topic docs also appears as a ChatML exchange")
    p.add_argument("--no-autocast", action="store_true",
                   help="train in float32 instead of bf16 autocast (about 1.7x slower)")
    return p.parse_args(argv)


def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


# ---------------------------------------------------------------------------------------------
# Data


def chat_examples(docs: list[demo_corpus.Document], every: int) -> list[str]:
    """ChatML copies of some documents: the user asks about an object, the assistant answers
    with the start of its documentation. Teaches the chat template and `<|im_end|>`."""
    out = []
    for doc in docs:
        if doc.kind == "module" or _hash_int("chat" + doc.text) % every:
            continue
        body = doc.text.split("\n\n", 1)[-1] if doc.kind != "topic" else \
            doc.text.split("\n", 2)[-1].strip()
        answer = ""
        for para in body.split("\n\n"):
            if answer and len(answer) + len(para) > 800:
                break
            answer = f"{answer}\n\n{para}" if answer else para
        question = QUESTIONS[_hash_int(doc.title) % len(QUESTIONS)].format(
            name=f"the {doc.title} statement" if doc.kind == "topic" else doc.title)
        out.append(f"<|im_start|>user\n{question}<|im_end|>\n"
                   f"<|im_start|>assistant\n{answer.strip()}<|im_end|>\n")
    return out


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int, order: list[int]):
    """Concatenate documents in `order`, each followed by EOS, into [num_windows, seq_len + 1]
    windows that overlap by one token (inputs = w[:-1], targets = w[1:])."""
    import torch
    stream: list[int] = []
    for i in order:
        stream.extend(token_lists[i])
        stream.append(eos_id)
    num = (len(stream) - 1) // seq_len
    data = torch.tensor(stream[:num * seq_len + 1], dtype=torch.long)
    return data.unfold(0, seq_len + 1, seq_len)


def batches(token_lists: list[list[int]], eos_id: int, seq_len: int, batch_size: int,
            seed: int):
    """Endless batches: each epoch reshuffles the documents (then the windows), seeded."""
    import torch
    epoch = 0
    while True:
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(token_lists), generator=gen).tolist()
        windows = pack(token_lists, eos_id, seq_len, order)
        perm = torch.randperm(len(windows), generator=gen)
        for start in range(0, len(perm) - batch_size + 1, batch_size):
            yield epoch, windows[perm[start:start + batch_size]]
        epoch += 1


# ---------------------------------------------------------------------------------------------
# Model and training


def build_model(vocab_size: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=3,
                         **MODEL_SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model


def lr_at(step: float, args: argparse.Namespace, total: int) -> float:
    """Linear warmup, then cosine down to `min_lr_ratio * lr` at step `total`."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total - args.warmup_steps))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, args: argparse.Namespace):
    import torch
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def loss_on(model, windows, autocast: bool):
    import torch
    import torch.nn.functional as F
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                           windows[:, 1:].reshape(-1))


def evaluate(model, val_windows, autocast: bool, batch_size: int = 8) -> float:
    """Mean token cross-entropy (nats) over the held-out windows."""
    import torch
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val_windows), batch_size):
            w = val_windows[start:start + batch_size]
            total += loss_on(model, w, autocast).item() * w[:, 1:].numel()
            count += w[:, 1:].numel()
    model.train()
    return total / max(1, count)


def train(model, train_tokens, val_windows, eos_id, args) -> dict:
    """The training loop; returns the facts the model card records."""
    import torch
    autocast = not args.no_autocast
    optimizer = make_optimizer(model, args)
    data = batches(train_tokens, eos_id, args.seq_len, args.batch_size, args.seed)
    total = args.steps or 10 ** 9
    deadline = time.monotonic() + args.minutes * 60
    start = time.monotonic()
    timed_from, smooth, log, time_limited, lr = None, None, [], False, 0.0
    model.train()
    step = 0
    while step < total:
        if time.monotonic() > deadline:
            print(f"stopping at the {args.minutes:g}-minute cap after {step} of {total} steps",
                  flush=True)
            break
        # Pacing: when the clock is further along than the steps (a slow or busy machine),
        # follow the clock, so that a run cut by the time cap still ends annealed.
        effective_step: float = step
        paced = (time.monotonic() - start) / (deadline - start) * total
        if step >= args.warmup_steps and total < 10 ** 9 and paced > step:
            effective_step, time_limited = paced, True
        for group in optimizer.param_groups:
            group["lr"] = lr = lr_at(effective_step, args, total)
        epoch, windows = next(data)
        loss = loss_on(model, windows, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step == 3:
            timed_from = time.monotonic()
        if step == 13 and not args.steps:  # fit the schedule to the time budget
            per_step = (time.monotonic() - timed_from) / 10
            left = deadline - time.monotonic()
            total = step + int(0.9 * left / (per_step * (1 + 1.0 / args.eval_every)))
            print(f"{per_step:.2f} s/step -> {total} steps in {args.minutes:g} minutes",
                  flush=True)
        if step % args.eval_every == 0 or step == total:
            val = evaluate(model, val_windows, autocast)
            elapsed = time.monotonic() - start
            tok_s = step * args.batch_size * args.seq_len / elapsed
            log.append({"step": step, "epoch": epoch, "train_loss": round(smooth, 4),
                        "val_loss": round(val, 4), "minutes": round(elapsed / 60, 2)})
            print(f"step {step:5d}/{total} epoch {epoch} lr {lr:.2e} "
                  f"train {smooth:.3f} val {val:.3f} (ppl {math.exp(val):.1f}) "
                  f"{tok_s:.0f} tok/s {elapsed / 60:.1f} min", flush=True)
    seconds = time.monotonic() - start
    return {"steps": step, "planned_steps": total, "time_limited": time_limited,
            "train_seconds": round(seconds, 1),
            "final_train_loss": round(smooth, 4), "log": log,
            "tokens_seen": step * args.batch_size * args.seq_len}


# ---------------------------------------------------------------------------------------------
# Saving


def save_model(model, tokenizer, out: Path) -> None:
    import torch
    from transformers import GenerationConfig
    model = model.to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=[0, 2],
                                               pad_token_id=3)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    for f in out.iterdir():
        f.chmod(0o644)  # save_pretrained may create 0600 files; these ship as package data


def heldout_text(heldout: list[demo_corpus.Document]) -> str:
    parts: list[str] = []
    for doc in heldout:
        if sum(len(p) + 2 for p in parts) >= HELDOUT_CHARS:
            break
        parts.append(doc.text)
    return "\n\n".join(parts) + "\n"


def greedy_samples(out: Path, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 40) -> list[dict]:
    """Reload the saved model the way any HF model is loaded and complete a few prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    samples = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        samples.append({"prompt": prompt,
                        "completion": tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
    chat = tok.apply_chat_template([{"role": "user", "content": "What does json.dumps do?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(chat, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=60, do_sample=False)
    samples.append({"prompt": "[chat] What does json.dumps do?",
                    "completion": tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
    return samples


def python_license_text() -> str:
    path = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" \
        / "LICENSE.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return ("The full license text is at https://docs.python.org/3/license.html "
            "(LICENSE.txt was not found next to this interpreter's standard library).\n")


def write_license(out: Path) -> None:
    (out / "LICENSE-DATA.txt").write_text(f"""\
Training data of this model: license and source
================================================

The weights and the tokenizer in this directory were trained only on text that ships with
the CPython interpreter ({demo_corpus.corpus_provenance()}):

* `pydoc_data.topics`: the interactive-help pages generated from CPython's Doc/ directory.
  The Python documentation is distributed under the Python Software Foundation License
  Version 2; code examples, recipes and other code in the documentation are additionally
  licensed under the Zero-Clause BSD license (see "Licenses and Acknowledgements for
  Incorporated Software" in the docs, https://docs.python.org/3/license.html).
* Docstrings of standard-library modules, read with `inspect.getdoc`: part of CPython's
  source code, under the Python Software Foundation License Version 2.

As the PSF License asks of derivative works, the license and copyright notice of the Python
release the text came from are reproduced below, verbatim.

--------------------------------------------------------------------------------------------
{python_license_text()}""", encoding="utf-8")


def write_card(out: Path, facts: dict) -> None:
    samples = "\n".join(f"* `{s['prompt']}` → {json.dumps(s['completion'])}"
                        for s in facts["samples"])
    curve = "\n".join(f"| {r['step']} | {r['epoch']} | {r['train_loss']:.3f} | "
                      f"{r['val_loss']:.3f} | {r['minutes']:.1f} |" for r in facts["log"])
    (out / "README.md").write_text(f"""\
# sluice demo model

A small Llama-architecture language model trained from scratch by the sluice project, so that
sluice works on a fresh machine with no download. It writes text that reads like Python's
documentation; it knows nothing else and is not an assistant. Loaded like any other Hugging
Face model directory (config.json, model.safetensors, tokenizer.json, chat template).

| | |
|---|---|
| architecture | LlamaForCausalLM: {facts['shape']} |
| parameters | {facts['num_params']:,} (tied input/output embeddings) |
| stored as | bfloat16 safetensors ({facts['weights_mb']:.1f} MB); run in float32 on CPU |
| tokenizer | byte-level BPE, {facts['vocab_size']} tokens, trained on the same text; special tokens `<\\|endoftext\\|>` (bos/eos, id 0), `<\\|im_start\\|>` (1), `<\\|im_end\\|>` (2), `<\\|pad\\|>` (3); ChatML chat template |
| training data | {facts['corpus']}; {facts['train_docs']} documents ({facts['train_tokens']:,} tokens) plus {facts['chat_docs']} ChatML copies of some of them; {facts['heldout_docs']} documents held out (sha256 of the text mod {demo_corpus.HELDOUT_MODULUS} == 0) |
| data license | Python Software Foundation License v2 (docs and docstrings), Zero-Clause BSD for code in the docs; see LICENSE-DATA.txt |
| training | {facts['steps']} steps × {facts['batch_size']} × {facts['seq_len']} tokens ({facts['tokens_seen']:,} tokens, {facts['epochs']:.1f} epochs), AdamW, warmup + cosine LR (peak {facts['lr']}), bf16 autocast, seed {facts['seed']} |
| training time | {facts['train_seconds'] / 60:.1f} minutes of training ({facts['total_seconds'] / 60:.1f} minutes in all) on {facts['threads']} CPU thread(s), torch {facts['torch']}, {facts['python']} |
| final losses | train {facts['final_train_loss']:.3f}, held-out {facts['final_val_loss']:.3f} nats/token (perplexity {math.exp(facts['final_val_loss']):.1f}) |

`heldout.txt` holds the first {HELDOUT_CHARS} characters' worth of held-out documents (never
trained on), for perplexity checks.

## Rebuild

```
{facts['command']}
```

The corpus is read from the running interpreter, so the same CPython version, torch version and
thread count give the same weights; the script prints the corpus digest (this model's:
`{facts['corpus_sha256']}`).

## Greedy samples

{samples}

## Training curve

| step | epoch | train loss | held-out loss | minutes |
|---|---|---|---|---|
{curve}
""", encoding="utf-8")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if args.threads == 1 else "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    from sluice.testing.tiny_models import build_tokenizer
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    out = args.out.resolve()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    docs = demo_corpus.collect_documents_isolated()
    train_docs, heldout = demo_corpus.split_documents(docs)
    chats = chat_examples(train_docs, args.chat_fraction)
    digest = demo_corpus.corpus_digest(docs)
    print(f"corpus sha256 {digest[:16]}: {len(train_docs)} train documents "
          f"({sum(len(d.text) for d in train_docs):,} chars) + {len(chats)} chat copies, "
          f"{len(heldout)} held out; {time.monotonic() - t0:.1f}s", flush=True)

    tokenizer = build_tokenizer(staging, vocab_size=args.vocab_size,
                                texts=[d.text for d in train_docs])
    tokenizer.model_max_length = MODEL_SHAPE["max_position_embeddings"]
    eos_id = tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                            "<|pad|>"]) == [0, 1, 2, 3]
    encode = tokenizer.backend_tokenizer.encode_batch
    train_tokens = [e.ids for e in encode([d.text for d in train_docs] + chats)]
    heldout_tokens = [e.ids for e in encode([d.text for d in heldout])]
    val_windows = pack(heldout_tokens, eos_id, args.seq_len, list(range(len(heldout_tokens))))
    num_train_tokens = sum(len(t) + 1 for t in train_tokens)
    print(f"tokenizer: {len(tokenizer)} tokens; {num_train_tokens:,} train tokens, "
          f"{val_windows[:, 1:].numel():,} held-out tokens; {time.monotonic() - t0:.1f}s",
          flush=True)

    model = build_model(len(tokenizer), args.seed)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params:,} parameters {MODEL_SHAPE}", flush=True)
    result = train(model, train_tokens, val_windows, eos_id, args)

    save_model(model, tokenizer, staging)
    (staging / "heldout.txt").write_text(heldout_text(heldout), encoding="utf-8")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(staging),
                                                                 dtype=torch.float32)
    final_val = evaluate(reloaded, val_windows, autocast=False)  # what the engine will see
    print(f"saved weights, held-out loss in float32: {final_val:.3f} "
          f"(perplexity {math.exp(final_val):.1f})", flush=True)
    samples = greedy_samples(staging)
    for s in samples:
        print(f"  {s['prompt']!r} -> {s['completion']!r}", flush=True)

    steps = result["planned_steps"] if result["time_limited"] else result["steps"]
    command = ["python", "tools/train_demo_model.py", "--steps", str(steps),
               "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.out.resolve() != DEFAULT_OUT:
        command += ["--out", str(args.out)]
    defaults = vars(parse_args([]))
    for key in ("vocab_size", "seq_len", "batch_size", "lr", "min_lr_ratio", "warmup_steps",
                "weight_decay", "grad_clip", "eval_every", "chat_fraction", "no_autocast"):
        if getattr(args, key) != defaults[key]:
            value = getattr(args, key)
            command += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    if result["time_limited"]:
        command += [(f"--minutes {args.minutes:g}  # NOTE: this run was paced by the time cap "
                     f"(the LR schedule followed the clock; {result['steps']} of "
                     f"{result['planned_steps']} planned steps), so a rerun matches it only "
                     "approximately")]
    weights_mb = sum(f.stat().st_size for f in staging.glob("*.safetensors")) / 1e6
    facts = dict(result, shape=MODEL_SHAPE, num_params=num_params, weights_mb=weights_mb,
                 vocab_size=len(tokenizer), corpus=demo_corpus.corpus_provenance(),
                 corpus_sha256=digest, train_docs=len(train_docs), chat_docs=len(chats),
                 heldout_docs=len(heldout),
                 train_tokens=num_train_tokens, batch_size=args.batch_size, seq_len=args.seq_len,
                 epochs=result["tokens_seen"] / num_train_tokens, lr=args.lr, seed=args.seed,
                 threads=args.threads, torch=torch.__version__,
                 python=f"CPython {sys.version.split()[0]}", final_val_loss=final_val,
                 samples=samples, total_seconds=time.monotonic() - t0,
                 command=" ".join(command))
    write_license(staging)
    write_card(staging, facts)
    (staging / "training_log.json").write_text(json.dumps(
        {k: v for k, v in facts.items() if k != "samples"}, indent=1) + "\n")
    for f in staging.iterdir():
        f.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"wrote {out} ({size_mb:.1f} MB); {result['train_seconds'] / 60:.1f} min training, "
          f"{(time.monotonic() - t0) / 60:.1f} min in all", flush=True)


if __name__ == "__main__":
    main()
