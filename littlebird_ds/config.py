"""LittleBird architecture configuration.

Only the architecture lives here. Parallel and runtime settings (tensor/sequence parallel
sizes, ZeRO, activation checkpointing policy) belong to the training engine, not to the
model config. Every field is checked before any module is built; a bad value raises a
``ValueError`` that names the field and the fix. The config is never mutated by the model.
"""

from __future__ import annotations

from transformers import PretrainedConfig

#: Attention kernels a config may ask for. ``auto`` picks the fastest valid kernel for the
#: device and for training vs inference at call time (see ``littlebird_ds.model.attention``).
ATTENTION_KERNELS = ("auto", "eager", "blocked", "flex")
HIDDEN_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")
FIRST_TOKEN_BIAS = ("constant", "linear")
BIALIBI_INITS = ("alibi", "directional")


class LittleBirdConfig(PretrainedConfig):
    r"""Configuration of a LittleBird encoder.

    Args:
        vocab_size: size of the token vocabulary.
        hidden_size: model width ``d``.
        num_hidden_layers: number of LittleBird layers.
        num_attention_heads: heads ``H``; must divide ``hidden_size``.
        intermediate_size: feed-forward inner width.
        hidden_act: feed-forward activation (BERT: ``gelu``).
        hidden_dropout_prob: dropout on embeddings and on each sub-layer output.
        attention_probs_dropout_prob: dropout on attention probabilities.
        type_vocab_size: number of token types (segments); 2 for ``[CLS] A [SEP] B [SEP]``.
        layer_norm_eps: LayerNorm epsilon.
        initializer_range: std of the normal initialiser of weight matrices.
        pad_token_id: id of ``[PAD]``; inputs are padded with it to whole blocks.
        block_size: ``b``, the block of the sliding window. Every query sees block 0, a
            three-block window and the packed keys.
        pack_size: ``s``, the length of the learned packed sequence of LUNA-style pack &
            unpack attention. ``0`` disables pack & unpack attention (the "sliding window
            only" ablation).
        attention_kernel: ``"auto"`` (default: the fastest valid kernel for the device and for
            training vs inference), ``"eager"`` (readable blocked reference kernel, trains
            everywhere), ``"blocked"`` (same math, flash-style backward: faster and lighter,
            trains everywhere) or ``"flex"`` (``torch.nn.attention.flex_attention``; on CPU
            inference only, torch has no CPU backward for it).
        bialibi_first_token: ``"constant"`` (default): the first token ``[CLS]`` is at distance
            ``alpha`` from every position; ``"linear"``: ``alpha * |i - j|``.
        bialibi_global_keys: how many leading keys get that first-token term (``1``, the
            default and the spec: ``[CLS]`` only). Up to ``block_size``: the question of a QA
            input (in block 0) is then seen from every distance at the same bias instead of
            ``beta * distance`` below it (project option; docs/qa.md, "Question reach").
        bialibi_init: ``"alibi"`` (default, the spec): ``alpha = beta = gamma`` = the ALiBi
            slope of each head. ``"directional"``: the same, except that the steepest quarter
            of the heads starts looking left (``gamma`` raised by 1: keys on the right fade
            by ``e`` per token) and the next quarter right, so a model without position
            embeddings can tell the word before from the word after from its first step
            (project option; docs/qa.md, "Direction-aware slopes").
        rss_head: ``LittleBirdForMaskedLM`` gets a recurring-span-selection head (the
            second pretraining objective, ``pretrain --rss-weight``; spec section 5).
    """

    model_type = "littlebird"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
        block_size: int = 64,
        pack_size: int = 64,
        attention_kernel: str = "auto",
        bialibi_first_token: str = "constant",
        bialibi_global_keys: int = 1,
        bialibi_init: str = "alibi",
        rss_head: bool = False,
        **kwargs,
    ):
        # Validate before anything is stored or built (PretrainedConfig.__init__ included).
        _validate(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            hidden_act=hidden_act,
            hidden_dropout_prob=hidden_dropout_prob,
            attention_probs_dropout_prob=attention_probs_dropout_prob,
            type_vocab_size=type_vocab_size,
            layer_norm_eps=layer_norm_eps,
            initializer_range=initializer_range,
            pad_token_id=pad_token_id,
            block_size=block_size,
            pack_size=pack_size,
            attention_kernel=attention_kernel,
            bialibi_first_token=bialibi_first_token,
            bialibi_global_keys=bialibi_global_keys,
            bialibi_init=bialibi_init,
        )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.block_size = block_size
        self.pack_size = pack_size
        self.attention_kernel = attention_kernel
        self.bialibi_first_token = bialibi_first_token
        self.bialibi_global_keys = bialibi_global_keys
        self.bialibi_init = bialibi_init
        self.rss_head = bool(rss_head)
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _check_int(name: str, value, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"LittleBirdConfig.{name} must be an integer >= {minimum}, got {value!r}; {fix}")


def _check_prob(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"LittleBirdConfig.{name} must be a probability in [0, 1), got {value!r}; use e.g. 0.1, or 0.0 to disable dropout"
        )


def _validate(**f) -> None:
    _check_int("vocab_size", f["vocab_size"], 1, "set it to the tokenizer's vocabulary size (len(tokenizer))")
    _check_int("hidden_size", f["hidden_size"], 1, "use e.g. 768 (base) or 256 (small)")
    _check_int("num_hidden_layers", f["num_hidden_layers"], 1, "use e.g. 12 (base)")
    _check_int("num_attention_heads", f["num_attention_heads"], 1, "use e.g. 12 (base)")
    if f["hidden_size"] % f["num_attention_heads"]:
        raise ValueError(
            f"LittleBirdConfig.hidden_size ({f['hidden_size']}) must be divisible by num_attention_heads "
            f"({f['num_attention_heads']}); choose a head count that divides the width"
        )
    _check_int("intermediate_size", f["intermediate_size"], 1, "use 4 * hidden_size as BERT does")
    if f["hidden_act"] not in HIDDEN_ACTS:
        raise ValueError(f"LittleBirdConfig.hidden_act must be one of {HIDDEN_ACTS}, got {f['hidden_act']!r}")
    _check_prob("hidden_dropout_prob", f["hidden_dropout_prob"])
    _check_prob("attention_probs_dropout_prob", f["attention_probs_dropout_prob"])
    _check_int("type_vocab_size", f["type_vocab_size"], 1, "use 2 for [CLS] A [SEP] B [SEP] inputs")
    eps = f["layer_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"LittleBirdConfig.layer_norm_eps must be > 0, got {eps!r}; use 1e-12 as BERT does")
    ir = f["initializer_range"]
    if isinstance(ir, bool) or not isinstance(ir, (int, float)) or not ir > 0:
        raise ValueError(f"LittleBirdConfig.initializer_range must be > 0, got {ir!r}; use 0.02 as BERT does")
    _check_int("pad_token_id", f["pad_token_id"], 0, "set it to the tokenizer's [PAD] id")
    if f["pad_token_id"] >= f["vocab_size"]:
        raise ValueError(
            f"LittleBirdConfig.pad_token_id ({f['pad_token_id']}) must be < vocab_size ({f['vocab_size']}); "
            "set it to the tokenizer's [PAD] id"
        )
    _check_int("block_size", f["block_size"], 1, "use 64 (the default)")
    _check_int("pack_size", f["pack_size"], 0, "use 64 (the default), or 0 to disable pack & unpack attention")
    if f["attention_kernel"] not in ATTENTION_KERNELS:
        raise ValueError(
            f"LittleBirdConfig.attention_kernel must be one of {ATTENTION_KERNELS}, got {f['attention_kernel']!r}; "
            "use 'auto' to pick the fastest valid kernel"
        )
    if f["bialibi_first_token"] not in FIRST_TOKEN_BIAS:
        raise ValueError(
            f"LittleBirdConfig.bialibi_first_token must be one of {FIRST_TOKEN_BIAS}, "
            f"got {f['bialibi_first_token']!r}"
        )
    if f["bialibi_init"] not in BIALIBI_INITS:
        raise ValueError(
            f"LittleBirdConfig.bialibi_init must be one of {BIALIBI_INITS}, got {f['bialibi_init']!r}; "
            "use 'alibi' (the spec) or 'directional'"
        )
    _check_int("bialibi_global_keys", f["bialibi_global_keys"], 1,
               "use 1 ([CLS] only, the spec) or up to block_size (the whole first block)")
    if f["bialibi_global_keys"] > f["block_size"]:
        raise ValueError(
            f"LittleBirdConfig.bialibi_global_keys ({f['bialibi_global_keys']}) must be <= block_size "
            f"({f['block_size']}): only block 0 is seen by every query; use at most {f['block_size']}"
        )
