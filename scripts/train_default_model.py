"""Train ember's bundled default model: a tiny Llama that answers every chat with a fortune cookie.

It exists so that `make run` chats offline on a fresh clone, with no download, in a model small enough
to commit (~8 MB). The corpus is Debian's `fortunes` and `fortunes-min` packages
(`apt-get install fortunes`), read from /usr/share/games/fortunes. Every fortune becomes one ChatML
conversation (a random request, then the fortune as the answer), so the model learns the chat format
and to stop with <|im_end|>. Training uses transformers' own Llama, so the checkpoint is a standard
config.json + safetensors folder that any tool can load.

    python scripts/train_default_model.py --minutes 20 --out ember/assets/default
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

FORTUNES = Path("/usr/share/games/fortunes")
SKIPPED_FILES = {"art", "ascii-art"}  # pictures, not text
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
REQUESTS = [
    "Tell me a fortune.", "Say something wise.", "Hi!", "Hello", "What should I know today?",
    "Give me a quote.", "Cheer me up.", "Any advice?", "Tell me something funny.", "What is the meaning of life?",
    "Who are you?", "I'm bored.", "Share a thought.", "What do you think?", "Say something.",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def read_fortunes() -> list[str]:
    fortunes = []
    for path in sorted(FORTUNES.iterdir()):
        if path.suffix or path.name in SKIPPED_FILES:
            continue
        for text in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = text.strip("\n%").replace("\t", "    ")
            if text.strip() and len(text) <= 600:
                fortunes.append(text)
    if not fortunes:
        raise SystemExit(f"no fortunes under {FORTUNES}; install Debian's `fortunes` package")
    return fortunes


def conversation(fortune: str, rng: random.Random) -> str:
    return f"<|im_start|>user\n{rng.choice(REQUESTS)}<|im_end|>\n<|im_start|>assistant\n{fortune}<|im_end|>\n"


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def batches(ids: list[list[int]], seq_len: int, batch: int, pad: int, rng: random.Random):
    """Pack whole conversations into rows of seq_len tokens (padding is masked out of the loss)."""
    while True:
        rng.shuffle(ids)
        rows, row = [], []
        for conv in ids:
            conv = conv[:seq_len]
            if len(row) + len(conv) > seq_len:
                rows.append(row + [pad] * (seq_len - len(row)))
                row = []
            row += conv
            if len(rows) == batch:
                tokens = torch.tensor(rows)
                labels = tokens.masked_fill(tokens == pad, -100)
                yield tokens, labels
                rows = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("ember/assets/default"))
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    rng = random.Random(0)
    torch.manual_seed(0)
    fortunes = read_fortunes()
    texts = [conversation(f, rng) for f in fortunes]
    tokenizer = train_tokenizer(texts, args.vocab)
    pad = tokenizer.token_to_id("<|endoftext|>")
    ids = [tokenizer.encode(t).ids for t in texts]
    print(f"{len(fortunes)} fortunes, {sum(map(len, ids))} tokens")

    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=pad, eos_token_id=tokenizer.token_to_id("<|im_end|>"), pad_token_id=pad,
    )
    model = transformers.LlamaForCausalLM(config)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    deadline = time.monotonic() + args.minutes * 60
    started, step, smoothed = time.monotonic(), 0, None
    for tokens, labels in batches(ids, args.seq_len, args.batch, pad, rng):
        elapsed = (time.monotonic() - started) / (deadline - started)
        if elapsed >= 1:
            break
        # linear warm-up, then cosine decay over the time budget (steps are unknown in advance)
        scale = min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(elapsed * torch.pi)).item()))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * scale
        loss = model(input_ids=tokens, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"step {step} loss {smoothed:.3f} ({elapsed:.0%} of the time budget)", flush=True)
        step += 1

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save(str(args.out / "tokenizer.json"))
    (args.out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    print(f"saved to {args.out} after {step} steps, loss {smoothed:.3f}")


if __name__ == "__main__":
    main()
