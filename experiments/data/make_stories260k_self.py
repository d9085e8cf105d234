"""Write ``stories260k_self.txt``: stories that stories260K writes itself, the retain domain of
``experiments/pretrained-quick.yaml``.

stories260K was pretrained on TinyStories, which is not among the corpora available offline. Its
own samples at temperature 1, drawn once before any adaptation, stand in for its training
distribution: a rise of the loss on them measures how far adaptation moved the model away from
what it knew. Each story starts from BOS and ends at EOS or after ``--max-new-tokens``.

    python experiments/data/make_stories260k_self.py \
        ../shared/data/models/stories260K/stories260K.gguf

is how the committed file was made (seed 0, 160 stories, 256 new tokens at most).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from adaptune.trainables.config import ModelConfig
from adaptune.trainables.model import build_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="path to stories260K.gguf")
    parser.add_argument("--out", default=str(Path(__file__).with_name("stories260k_self.txt")))
    parser.add_argument("--stories", type=int, default=160)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = ModelConfig(name=str(Path(args.gguf).resolve()))
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tokenizer).eval()
    torch.manual_seed(args.seed)
    bos = torch.full((16, 1), tokenizer.bos_token_id)  # 16 stories per call
    stories: list[str] = []
    with torch.no_grad():
        while len(stories) < args.stories:
            out = model.generate(bos, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=args.max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.eos_token_id)
            for row in out:
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                if text:
                    stories.append(" ".join(text.split()))
    Path(args.out).write_text("\n\n".join(stories[: args.stories]) + "\n", encoding="utf-8")
    print(f"{args.out}: {min(len(stories), args.stories)} stories")


if __name__ == "__main__":
    main()
