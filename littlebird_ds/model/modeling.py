"""Hugging Face model classes: ``LittleBirdModel``, ``LittleBirdForMaskedLM`` (optionally with
a recurring-span-selection head), ``LittleBirdForQuestionAnswering``.

The model owns sequence length: it validates inputs, pads them to whole blocks (at least
four) with :func:`pad_to_blocks`, and cuts every output back to the input length.

One forward per class, whatever the parallelism: heads run on the tokens this process holds
(``LittleBirdModel(..., keep_sharded=True)``) and cut or gather through
``LittleBirdModel.token_sharding`` (:class:`LocalTokens` here; sequence parallelism swaps it).
Tensor parallelism swaps layers (the LM head's ``token_losses``/``gather_vocab`` included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MaskedLMOutput, QuestionAnsweringModelOutput
from transformers.utils import ModelOutput

from ..config import LittleBirdConfig
from .bialibi import BiALiBi
from .layers import LittleBirdEmbeddings, LittleBirdLayer
from .layout import BlockLayout, LocalTokens, pad_to_blocks


@dataclass
class LittleBirdModelOutput(ModelOutput):
    """
    last_hidden_state: ``[B, L, d]`` token states at the input length ``L``.
    hidden_states: embeddings and every layer's output, each ``[B, L, d]`` (``output_hidden_states=True``).
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def validate_inputs(config: LittleBirdConfig, input_ids, attention_mask, token_type_ids, inputs_embeds) -> None:
    """Raise a ``ValueError`` naming the problem and the fix, before any computation."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise ValueError(
                f"input_ids must be an integer tensor of token ids, got dtype {input_ids.dtype}; "
                "convert with input_ids.long() or pass embeddings through inputs_embeds"
            )
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}; "
                "add a batch dimension with input_ids.unsqueeze(0)"
            )
        shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape [batch, length, {config.hidden_size}], got {tuple(inputs_embeds.shape)}"
            )
        shape = tuple(inputs_embeds.shape[:2])
    if shape[1] == 0:
        raise ValueError("empty sequence: the input has length 0; every sequence needs at least its [CLS] token")
    if input_ids is not None and input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {config.vocab_size}); check that the tokenizer matches "
                "the model (config.vocab_size must be >= len(tokenizer))"
            )
    if attention_mask is not None:
        if tuple(attention_mask.shape) != shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the input has shape {shape}; "
                "pass the attention_mask returned by the tokenizer with the same input_ids"
            )
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
        empty = (attention_mask == 0).all(dim=1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(
                f"attention_mask rows {rows} are all padding; every sequence needs at least one real token "
                "(drop empty sequences from the batch)"
            )
    if token_type_ids is not None:
        if tuple(token_type_ids.shape) != shape:
            raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)} but the input has shape {shape}")
        if token_type_ids.is_floating_point() or int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= config.type_vocab_size:
            raise ValueError(f"token_type_ids must be integers in [0, {config.type_vocab_size})")


class LittleBirdPreTrainedModel(PreTrainedModel):
    config_class = LittleBirdConfig
    config: LittleBirdConfig
    base_model_prefix = "littlebird"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LittleBirdLayer"]
    _keep_in_fp32_modules = ["bialibi"]
    # Hugging Face's attn_implementation names are accepted (from_pretrained, set_attn_implementation);
    # LittleBird's attention is its own (block pattern + BiALiBi), so they map onto its kernels:
    # "eager" and "sdpa" run config.attention_kernel (its "auto" is already fused), "flex_attention"
    # runs the flex kernel (layers.UnpackSlidingWindowAttention.kernel_for).
    _supports_sdpa = True
    _supports_flex_attn = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, plus the model's code and ``auto_map`` so the
        folder loads with ``trust_remote_code=True`` where littlebird-ds is not installed
        (:mod:`.remote_code`)."""
        try:  # absent in the flattened copy a model folder carries: that copy saves plainly
            from littlebird_ds.model.remote_code import AUTO_MAP, write_remote_code
        except ImportError:
            return super().save_pretrained(save_directory, *args, **kwargs)
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BiALiBi):
            for p, raw in zip((module.alpha_raw, module.beta_raw, module.gamma_raw), module.initial_raw()):
                init.copy_(p, raw)
        elif isinstance(module, LittleBirdModel) and module.packed_init is not None:
            init.normal_(module.packed_init, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, LittleBirdLMHead):
            init.zeros_(module.bias)


class LittleBirdModel(LittleBirdPreTrainedModel):
    """LittleBird encoder: embeddings, the learned packed sequence ``P0 [s, d]``, layers."""

    def __init__(self, config: LittleBirdConfig):
        super().__init__(config)
        self.embeddings = LittleBirdEmbeddings(config)
        self.packed_init = nn.Parameter(torch.empty(config.pack_size, config.hidden_size)) if config.pack_size else None
        n = config.num_hidden_layers
        self.layers = nn.ModuleList(LittleBirdLayer(config, updates_packed=i < n - 1) for i in range(n))
        # Where this process's tokens are (all of them; sequence parallelism swaps it).
        self.token_sharding = LocalTokens()
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def prepare_inputs(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None):
        """Check the inputs, fill the default mask and token types, pad to whole blocks.

        Returns ``(padded {input_ids, token_type_ids, inputs_embeds} [B, l, ...], layout, L)``
        with ``L`` the input length. Shared with the sequence-parallel forward.
        """
        cfg = self.config
        validate_inputs(cfg, input_ids, attention_mask, token_type_ids, inputs_embeds)
        ref = input_ids if input_ids is not None else inputs_embeds
        B, L = ref.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.long, device=ref.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(B, L, dtype=torch.long, device=ref.device)
        padded, mask, L = pad_to_blocks(
            {"input_ids": input_ids, "token_type_ids": token_type_ids, "inputs_embeds": inputs_embeds},
            attention_mask,
            cfg.block_size,
            pad_values={"input_ids": cfg.pad_token_id},
            multiple=self.token_sharding.size,
        )
        return padded, BlockLayout.build(mask, cfg.block_size), L

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        keep_sharded: bool = False,
        **kwargs,
    ):
        """``keep_sharded=True`` (what the heads use): states stay as this process holds them,
        padded ``[B, l, d]`` (this rank's ``[B, l/P, d]`` under sequence parallelism), for
        ``self.token_sharding.gather(x, L)``; otherwise ``[B, L, d]``."""
        cfg = self.config
        padded, layout, L = self.prepare_inputs(input_ids, attention_mask, token_type_ids, inputs_embeds)
        shard = self.token_sharding
        B = layout.key_mask.shape[0]  # the layout covers the whole padded sequence on every rank
        x = self.embeddings(*(shard.local(padded[k]) for k in ("input_ids", "token_type_ids", "inputs_embeds")))
        p = None if self.packed_init is None else self.packed_init.to(x.dtype).unsqueeze(0).expand(B, -1, -1)  # [B, s, d]
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x, p = layer(x, p, layout)  # [B, t, d], [B, s, d]
            if hidden is not None:
                hidden.append(x)
        if not keep_sharded:
            x = shard.gather(x, L)
            hidden = None if hidden is None else [shard.gather(h, L) for h in hidden]
        out = LittleBirdModelOutput(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None)
        return out if _return_dict(cfg, return_dict) else out.to_tuple()


def masked_logits_kwargs(model) -> dict:
    """``{"masked_logits_only": True}`` when ``model`` (or the module a DeepSpeed engine wraps)
    is a :class:`LittleBirdForMaskedLM`; ``{}`` otherwise (BERT teachers)."""
    return {"masked_logits_only": True} if isinstance(getattr(model, "module", model), LittleBirdForMaskedLM) else {}


def _input_shape(input_ids, inputs_embeds) -> tuple[int, int]:
    return tuple((input_ids if input_ids is not None else inputs_embeds).shape[:2])


def _gather_hidden(shard: LocalTokens, hidden, length: int):
    return None if hidden is None else tuple(shard.gather(h, length) for h in hidden)


def _return_dict(config, return_dict: bool | None) -> bool:
    return return_dict if return_dict is not None else getattr(config, "return_dict", True)


class LittleBirdLMHead(nn.Module):
    """BERT masked-LM head: dense -> activation -> LayerNorm -> decoder tied to the token embeddings."""

    def __init__(self, config: LittleBirdConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias

    def token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross entropy per row ``[N]`` of ``logits [N, V]`` (0 where ``targets`` is -100)."""
        return nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none")

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (they already are; tensor parallelism gathers shards)."""
        return logits


class LittleBirdSpanSelectionHead(nn.Module):
    """Question-aware span selection (Ram et al. 2021, "Splinter"): the state of a question
    token, mapped by ``start``/``end``, is dotted with every token state to give that
    question's start/end logits over the sequence. Used by recurring span selection (RSS)."""

    def __init__(self, config: LittleBirdConfig):
        super().__init__()
        self.start = nn.Linear(config.hidden_size, config.hidden_size)
        self.end = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, questions: torch.Tensor,
                attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden [B, L, d]``, ``questions [B, Q]`` (positions; negative slots are unused
        and give rows of garbage the caller drops). Returns start and end logits ``[B, Q, L]``
        (fp32), pad positions at the lowest value."""
        index = questions.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        q = hidden.gather(1, index)  # [B, Q, d]
        keys = hidden.transpose(1, 2)  # [B, d, L]
        start = torch.bmm(self.start(q), keys).float()
        end = torch.bmm(self.end(q), keys).float()
        if attention_mask is not None:
            pad = ~attention_mask.bool().unsqueeze(1)  # [B, 1, L]
            start = start.masked_fill(pad, torch.finfo(start.dtype).min)
            end = end.masked_fill(pad, torch.finfo(end.dtype).min)
        return start, end


@dataclass
class LittleBirdMaskedLMOutput(MaskedLMOutput):
    """``MaskedLMOutput`` plus recurring span selection (with ``rss_questions``):
    ``rss_loss`` (mean of the start and end cross-entropies over the questions) and the
    questions' ``rss_start_logits``/``rss_end_logits`` ``[N, L]``."""

    rss_loss: torch.Tensor | None = None
    rss_start_logits: torch.Tensor | None = None
    rss_end_logits: torch.Tensor | None = None


class LittleBirdForMaskedLM(LittleBirdPreTrainedModel):
    """Masked-LM head on the encoder. With ``config.rss_head = True`` (a config field,
    saved with the model) it also has a :class:`LittleBirdSpanSelectionHead` for recurring
    span selection, which ``pretrain --rss-weight`` trains next to the masked-LM loss."""

    _tied_weights_keys = {"lm_head.decoder.weight": "littlebird.embeddings.word_embeddings.weight"}

    def __init__(self, config: LittleBirdConfig):
        super().__init__(config)
        self.littlebird = LittleBirdModel(config)
        self.lm_head = LittleBirdLMHead(config)
        self.rss_head = LittleBirdSpanSelectionHead(config) if config.rss_head else None
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings):
        self.lm_head.decoder = new_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        masked_logits_only: bool = False,
        rss_questions: torch.Tensor | None = None,
        rss_starts: torch.Tensor | None = None,
        rss_ends: torch.Tensor | None = None,
        **kwargs,
    ):
        """``labels [B, L]``: token ids at masked positions, -100 elsewhere (ignored).

        ``rss_questions [B, Q]``: positions of the question tokens of recurring span
        selection (-1 where a row has fewer), ``rss_starts``/``rss_ends [B, Q]`` their targets
        (first and last position of the kept occurrence); needs ``config.rss_head``.

        ``masked_logits_only=True`` (with ``labels``) computes the vocabulary projection only
        at labelled positions and returns ``logits [M, V]`` in row-major order of
        ``labels != -100``: the same loss, without the ``[B, L, V]`` tensor that dominates the
        cost of pretraining small models with large vocabularies.
        """
        out = self.littlebird(input_ids, attention_mask, token_type_ids, inputs_embeds,
                              output_hidden_states=output_hidden_states, return_dict=True, keep_sharded=True)
        shard = self.littlebird.token_sharding
        x = out.last_hidden_state  # [B, t, d]: the padded tokens this process holds
        B, L = _input_shape(input_ids, inputs_embeds)
        if labels is not None and tuple(labels.shape) != (B, L):
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {(B, L)}")
        if masked_logits_only and labels is None:
            raise ValueError("masked_logits_only=True needs labels (it keeps the positions where labels != -100)")
        loss = None
        if labels is None:
            logits = shard.gather(self.lm_head.gather_vocab(self.lm_head(x)), L)  # [B, L, V]
        else:
            padded = nn.functional.pad(labels, (0, x.shape[1] * shard.size - L), value=-100)  # [B, l]
            targets = shard.local(padded)  # [B, t]
            if masked_logits_only:
                here = targets != -100
                logits, targets = self.lm_head(x[here]), targets[here]  # [M_here, V], [M_here]
            else:
                logits = self.lm_head(x)  # [B, t, V]
            per_token = self.lm_head.token_losses(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss = shard.sum(per_token.sum()) / (labels != -100).sum()  # mean over labelled tokens
            logits = self.lm_head.gather_vocab(logits)
            logits = shard.gather_rows(logits, padded != -100) if masked_logits_only else shard.gather(logits, L)
        rss_loss = rss_start = rss_end = None
        if rss_questions is not None:
            if self.rss_head is None:
                raise ValueError("rss_questions given but the model has no span-selection head; build it with "
                                 "config.rss_head = True (pretrain --rss-weight does)")
            if rss_starts is None or rss_ends is None or rss_starts.shape != rss_questions.shape \
                    or rss_ends.shape != rss_questions.shape:
                raise ValueError("rss_questions, rss_starts and rss_ends must all be given, each [B, Q]")
            # Every token's state, replicated over sequence shards (its gradient returns to each shard's tokens).
            start_all, end_all = self.rss_head(shard.gather(x, L), rss_questions, attention_mask)
            valid = rss_questions >= 0
            rss_start, rss_end = start_all[valid], end_all[valid]  # [N, L]
            if bool(valid.any()):
                rss_loss = (nn.functional.cross_entropy(rss_start, rss_starts[valid])
                            + nn.functional.cross_entropy(rss_end, rss_ends[valid])) / 2
            else:  # no recurring span in this batch: a zero that keeps the head in the graph
                rss_loss = (start_all.sum() + end_all.sum()) * 0.0
        res = LittleBirdMaskedLMOutput(loss=loss, logits=logits, hidden_states=_gather_hidden(shard, out.hidden_states, L),
                                       rss_loss=rss_loss,
                                       rss_start_logits=rss_start, rss_end_logits=rss_end)
        return res if _return_dict(self.config, return_dict) else res.to_tuple()


class LittleBirdForQuestionAnswering(LittleBirdPreTrainedModel):
    """Extractive QA: start/end logits over every token. Pad positions (trailing and inserted
    by Padding Insertion) get the dtype's lowest logit, so they are never predicted."""

    def __init__(self, config: LittleBirdConfig):
        super().__init__(config)
        self.littlebird = LittleBirdModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        out = self.littlebird(input_ids, attention_mask, token_type_ids, inputs_embeds,
                              output_hidden_states=output_hidden_states, return_dict=True, keep_sharded=True)
        shard = self.littlebird.token_sharding
        L = _input_shape(input_ids, inputs_embeds)[1]
        logits = shard.gather(self.qa_outputs(out.last_hidden_state).float(), L)  # [B, t, 2] -> [B, L, 2]
        if attention_mask is not None:
            logits = logits.masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(logits.dtype).min)
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            # Positions outside the input are ignored, as in BERT.
            start = start_positions.view(-1).clamp(0, L)
            end = end_positions.view(-1).clamp(0, L)
            ce = nn.CrossEntropyLoss(ignore_index=L)
            loss = (ce(start_logits, start) + ce(end_logits, end)) / 2
        res = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                           hidden_states=_gather_hidden(shard, out.hidden_states, L))
        return res if _return_dict(self.config, return_dict) else res.to_tuple()
