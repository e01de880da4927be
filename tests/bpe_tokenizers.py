"""A real byte-level BPE tokenizer that cuts two long tags alike, and a text tower that reads its
token ids, for the eval tests of tags whose prompts tokenise alike: a model whose image features
are exactly their first tag's text features is perfect, so any score below 1.0 is the metric's."""

from __future__ import annotations

import torch

LONG_A = "alpha beta gamma delta epsilon zeta eta"
LONG_B = "alpha beta gamma delta epsilon zeta theta"  # cut like LONG_A at CONTEXT_LENGTH
CONTEXT_LENGTH = 6


def cut_alike_tokenizer(out_dir: str):
    """(tokenizer, tokenize): a BPE trained on LONG_A, LONG_B, cat and dog (vocabulary 300, saved to
    `out_dir`); `tokenize` cuts every text at CONTEXT_LENGTH tokens."""
    from vutrain.data.tokenizer import make_tokenize, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([LONG_A, LONG_B, "cat", "dog"] * 4, out_dir, vocab_size=300)
    return tokenizer, make_tokenize(tokenizer, CONTEXT_LENGTH)


class TokenEngine(torch.nn.Module):
    """Text features: a fixed function of the attended token ids (equal tokens, equal features);
    image n's features: ``images[pixel_values[n, 0, 0, 0]]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.module = torch.nn.Module()
        self.module.base = type("Base", (), {"config": type("C", (), {"projection_dim": table.shape[1]})})()
        self.table, self.images = table, torch.empty(0)

    def text(self, input_ids, attention_mask):
        position = torch.arange(1, input_ids.shape[1] + 1, dtype=torch.float32)
        return (self.table[input_ids] * (attention_mask * position)[..., None]).sum(dim=1)

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        img = None if pixel_values is None else self.images[pixel_values[:, 0, 0, 0].long()]
        return img, self.text(input_ids, attention_mask), None, None


def perfect_tag_model(tokenizer, tokenize, image_tags: list[list[str]]) -> tuple[TokenEngine, dict]:
    """(engine, batch): a TokenEngine (token table of seed 0, 16 wide) whose image n is exactly the
    text of its first tag, and one eval batch of those images, captioned "video n", with `image_tags`."""
    torch.manual_seed(0)
    engine = TokenEngine(torch.randn(len(tokenizer), 16))
    own_tag = tokenize([tags[0] for tags in image_tags])
    engine.images = engine.text(own_tag["input_ids"], own_tag["attention_mask"])
    n = len(image_tags)
    batch = dict(
        tokenize([f"video {i}" for i in range(n)]),
        pixel_values=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2),
        labels=[""] * n,
        label_sets=[[] for _ in range(n)],
        tags=image_tags,
    )
    return engine, batch
