"""The benchmarked systems, built at one size and one length, randomly initialised.

All systems share width, depth, heads, FFN width and vocabulary (``SIZES``), run batch 1 in
fp32, and have attention-probability dropout off (BigBird's block-sparse path has none, so
the others are not charged for it); hidden dropout stays at 0.1 for all. Each builder
returns ``(model, inputs)`` where ``inputs`` is the keyword dict of one forward call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: name -> (hidden, layers, heads, ffn, vocab)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "default": (256, 4, 4, 1024, 8000),
    "base": (768, 12, 12, 3072, 8000),
}

SYSTEMS = ("littlebird", "bigbird", "longformer", "bert")
#: The systems LittleBird's ratios are reported against.
PEERS = ("bigbird", "longformer", "bert")

BIGBIRD_BLOCK, BIGBIRD_RANDOM_BLOCKS = 64, 3
LONGFORMER_WINDOW = 128


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int

    @classmethod
    def named(cls, name: str) -> "Size":
        if name not in SIZES:
            raise ValueError(f"unknown size {name!r}; choose one of {sorted(SIZES)}")
        return cls(*SIZES[name])

    def common(self) -> dict:
        """The keyword arguments every HF config here spells the same way."""
        return dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.ffn,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.0,
        )


def _ids(length: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (1, length), generator=g)  # [1, L]
    ids[0, 0] = 2  # a [CLS]-like first token
    return ids


def littlebird(size: Size, length: int, kernel: str = "auto"):
    from littlebird_ds import LittleBirdConfig, LittleBirdModel

    cfg = LittleBirdConfig(**size.common(), block_size=64, pack_size=64, attention_kernel=kernel)
    ids = _ids(length, size.vocab)
    return LittleBirdModel(cfg), dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def bigbird(size: Size, length: int, kernel: str = "auto"):
    from transformers import BigBirdConfig, BigBirdModel

    cfg = BigBirdConfig(**size.common(), max_position_embeddings=length, attention_type="block_sparse",
                        block_size=BIGBIRD_BLOCK, num_random_blocks=BIGBIRD_RANDOM_BLOCKS)
    ids = _ids(length, size.vocab)
    return BigBirdModel(cfg, add_pooling_layer=False), dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def longformer(size: Size, length: int, kernel: str = "auto"):
    from transformers import LongformerConfig, LongformerModel

    # Positions start after padding_idx (RoBERTa convention), hence the + 2.
    cfg = LongformerConfig(**size.common(), max_position_embeddings=length + 2, attention_window=LONGFORMER_WINDOW)
    ids = _ids(length, size.vocab)
    global_mask = torch.zeros_like(ids)
    global_mask[0, 0] = 1  # one global token
    return LongformerModel(cfg, add_pooling_layer=False), dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), global_attention_mask=global_mask
    )


def bert(size: Size, length: int, kernel: str = "auto"):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(**size.common(), max_position_embeddings=length)
    cfg._attn_implementation = "sdpa"  # full attention through F.scaled_dot_product_attention
    ids = _ids(length, size.vocab)
    return BertModel(cfg, add_pooling_layer=False), dict(input_ids=ids, attention_mask=torch.ones_like(ids))


BUILDERS = {"littlebird": littlebird, "bigbird": bigbird, "longformer": longformer, "bert": bert}


def build(system: str, size: Size, length: int, kernel: str = "auto"):
    if system not in BUILDERS:
        raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")
    return BUILDERS[system](size, length, kernel)
