"""Behaviour of the LittleBird model classes on tiny configs."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForQuestionAnswering

import littlebird_ds as lb
from conftest import tiny_config


def _ids(B, L, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, L), generator=g)
    ids[:, 0] = 2  # [CLS]
    return ids


def test_outputs_and_hidden_states_come_back_at_input_length():
    cfg = tiny_config()
    model = lb.LittleBirdModel(cfg).eval()
    for L in (1, 13, 37, 64):
        out = model(_ids(2, L), output_hidden_states=True)
        assert out.last_hidden_state.shape == (2, L, cfg.hidden_size)
        assert len(out.hidden_states) == cfg.num_hidden_layers + 1
        assert all(h.shape == (2, L, cfg.hidden_size) for h in out.hidden_states)


def test_config_is_never_mutated_by_the_model():
    cfg = tiny_config()
    before = cfg.to_dict()
    model = lb.LittleBirdForQuestionAnswering(cfg).eval()
    model(_ids(1, 45), start_positions=torch.tensor([3]), end_positions=torch.tensor([5]))
    assert cfg.to_dict() == before


def test_padding_invariance_alone_and_inside_a_padded_batch():
    cfg = tiny_config()
    model = lb.LittleBirdModel(cfg).eval()
    short = _ids(1, 21, seed=1)
    long = _ids(1, 70, seed=2)
    alone = model(short).last_hidden_state
    batch = torch.full((2, 70), cfg.pad_token_id)
    batch[0, :21] = short[0]
    batch[1] = long[0]
    mask = torch.zeros(2, 70, dtype=torch.long)
    mask[0, :21] = 1
    mask[1] = 1
    together = model(batch, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(together[0, :21], alone[0], rtol=1e-5, atol=1e-5)


def _one_layer_output(model, ids):
    return model(ids).last_hidden_state[0]


def test_locality_without_packing_and_global_flow_with_packing():
    L, b = 96, 8  # 12 blocks
    query = 90  # block 11: window blocks 9, 10, 11
    far = 40  # block 5: outside the window and outside block 0
    for pack, expect_change in ((0, False), (4, True)):
        # A wide initialiser so the packed path carries a signal well above rounding.
        cfg = tiny_config(num_hidden_layers=1, pack_size=pack, block_size=b, initializer_range=0.3)
        torch.manual_seed(0)
        model = lb.LittleBirdModel(cfg).eval()
        ids = _ids(1, L)
        changed = ids.clone()
        changed[0, far] = (ids[0, far] + 7) % cfg.vocab_size
        before = _one_layer_output(model, ids)
        after = _one_layer_output(model, changed)
        diff = (before[query] - after[query]).abs().max().item()
        if expect_change:
            assert diff > 1e-4, (pack, diff)
        else:
            assert diff == 0.0, (pack, diff)
        # The changed token itself always changes.
        assert (before[far] - after[far]).abs().max().item() > 1e-6


def test_length_extrapolation_to_32k_tokens_stays_finite():
    cfg = tiny_config(block_size=64, pack_size=16, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    model = lb.LittleBirdModel(cfg).eval()
    with torch.no_grad():
        out = model(_ids(1, 32768)).last_hidden_state
    assert out.shape == (1, 32768, 16)
    assert torch.isfinite(out).all()


def test_save_pretrained_round_trip_in_a_fresh_process(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = lb.LittleBirdForQuestionAnswering(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    ids = _ids(2, 50)
    torch.save(ids, tmp_path / "ids.pt")
    # Bit equality needs the same reduction order on both sides: the same thread count (an
    # earlier test in this process may have changed it).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected = model(ids).start_logits
    finally:
        torch.set_num_threads(threads)
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, littlebird_ds
        from transformers import AutoModelForQuestionAnswering
        torch.set_num_threads(1)
        m = AutoModelForQuestionAnswering.from_pretrained({str(tmp_path / 'm')!r}).eval()
        assert type(m).__name__ == "LittleBirdForQuestionAnswering", type(m)
        ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
        exp = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        with torch.no_grad():
            got = m(ids).start_logits
        assert torch.equal(got, exp), (got - exp).abs().max()
        print("OK")
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_auto_classes_resolve_littlebird():
    cfg = AutoConfig.for_model("littlebird", vocab_size=50, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32, block_size=8, pack_size=4)
    assert isinstance(cfg, lb.LittleBirdConfig)
    assert isinstance(AutoModel.from_config(cfg), lb.LittleBirdModel)
    assert isinstance(AutoModelForMaskedLM.from_config(cfg), lb.LittleBirdForMaskedLM)
    assert isinstance(AutoModelForQuestionAnswering.from_config(cfg), lb.LittleBirdForQuestionAnswering)


def test_hugging_face_attn_implementation_names_load_and_map_onto_littlebird_kernels(tmp_path):
    """``attn_implementation`` as transformers users pass it: "sdpa" and "eager" load and run the
    configured kernel (outputs unchanged), "flex_attention" (at load or through
    ``set_attn_implementation``) runs the flex kernel, which CPU has for inference."""
    from littlebird_ds.model.layers import UnpackSlidingWindowAttention

    def kernels(m):
        return {a.kernel_for() for a in m.modules() if isinstance(a, UnpackSlidingWindowAttention)}

    lb.LittleBirdModel(tiny_config()).save_pretrained(tmp_path)
    ids = _ids(1, 40)
    with torch.no_grad():
        ref = AutoModel.from_pretrained(tmp_path).eval()(input_ids=ids).last_hidden_state
        for impl, kernel in (("sdpa", "auto"), ("eager", "auto"), ("flex_attention", "flex")):
            m = AutoModel.from_pretrained(tmp_path, attn_implementation=impl).eval()
            assert kernels(m) == {kernel}, impl
            torch.testing.assert_close(m(input_ids=ids).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
        m = AutoModel.from_pretrained(tmp_path).eval()
        m.set_attn_implementation("flex_attention")
        assert kernels(m) == {"flex"}
    fixed = lb.LittleBirdModel(tiny_config(attention_kernel="eager"))  # an explicit kernel wins
    fixed.set_attn_implementation("flex_attention")
    assert kernels(fixed) == {"eager"}


def test_masked_lm_decoder_is_tied_to_token_embeddings_after_reload(tmp_path):
    model = lb.LittleBirdForMaskedLM(tiny_config())
    assert model.lm_head.decoder.weight is model.littlebird.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path)
    again = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert again.lm_head.decoder.weight is again.littlebird.embeddings.word_embeddings.weight
    torch.testing.assert_close(again.lm_head.decoder.weight, model.lm_head.decoder.weight)


def _grads(model, ids, labels):
    model.zero_grad()
    model(ids, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_layer_forwards(model) -> list[int]:
    """Per layer, how many times its forward runs (a recomputation in backward counts again)."""
    counts = [0] * len(model.littlebird.layers)
    for i, layer in enumerate(model.littlebird.layers):
        # on a sub-module: checkpointing wraps the layer's forward, inside its __call__ hooks
        layer.attention.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_gradient_checkpointing_recomputes_every_layer_and_gives_the_same_gradients():
    """Checkpointing is on when each layer's forward runs again in backward (counted), and the
    gradients equal the run that keeps activations (dropout masks replayed)."""
    torch.manual_seed(0)
    model = lb.LittleBirdForMaskedLM(tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)).train()
    ids = _ids(2, 40)
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
    counts = _count_layer_forwards(model)
    torch.manual_seed(1)
    plain = _grads(model, ids, labels)
    assert counts == [1] * len(counts)
    # transformers 5 names it activation_checkpointing_enable (the old name warns there).
    for enable in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        if not hasattr(model, enable):
            continue
        model.gradient_checkpointing_disable()
        getattr(model, enable)()
        counts[:] = [0] * len(counts)
        torch.manual_seed(1)
        ckpt = _grads(model, ids, labels)
        assert counts == [2] * len(counts), (enable, counts)  # forward, then the recomputation in backward
        assert plain.keys() == ckpt.keys() == {n for n, _ in model.named_parameters()}
        for n in plain:
            torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_forward_and_backward_are_finite():
    model = lb.LittleBirdForQuestionAnswering(tiny_config()).to(torch.bfloat16).train()
    ids = _ids(2, 70)
    out = model(ids, start_positions=torch.tensor([3, 10]), end_positions=torch.tensor([4, 12]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.float()).all(), n


def test_question_answering_loss_and_padding_never_predicted():
    model = lb.LittleBirdForQuestionAnswering(tiny_config()).eval()
    ids = _ids(2, 30)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    out = model(ids, attention_mask=mask, start_positions=torch.tensor([2, 5]), end_positions=torch.tensor([4, 6]))
    assert out.start_logits.shape == (2, 30) and out.loss.ndim == 0
    assert (out.start_logits[1, 20:] < -1e30).all()


def test_return_dict_false_gives_tuples():
    model = lb.LittleBirdModel(tiny_config()).eval()
    out = model(_ids(1, 10), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 10, 24)


def test_inputs_embeds_equal_input_ids_path():
    model = lb.LittleBirdModel(tiny_config()).eval()
    ids = _ids(1, 33)
    a = model(ids).last_hidden_state
    b = model(inputs_embeds=model.embeddings.word_embeddings(ids)).last_hidden_state
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_ids=torch.tensor([[2, 5, 97]])), "outside the vocabulary"),
        (dict(input_ids=torch.tensor([[2, -1, 5]])), "outside the vocabulary"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty sequence"),
        (dict(input_ids=torch.tensor([[2, 5, 6]]), attention_mask=torch.ones(1, 4)), "attention_mask has shape"),
        (dict(input_ids=torch.tensor([[2, 5], [2, 6]]), attention_mask=torch.tensor([[1, 1], [0, 0]])), "all padding"),
        (dict(input_ids=torch.tensor([[2.0, 5.0]])), "integer tensor"),
        (dict(input_ids=torch.tensor([2, 5])), r"\[batch, length\]"),
        (dict(), "exactly one of"),
    ],
)
def test_bad_input_raises_a_clear_value_error(kwargs, match):
    model = lb.LittleBirdModel(tiny_config()).eval()
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("num_attention_heads", 5, "divisible by num_attention_heads"),
        ("block_size", 0, "block_size"),
        ("pack_size", -1, "pack_size"),
        ("attention_kernel", "magic", "attention_kernel"),
        ("hidden_dropout_prob", 1.5, "hidden_dropout_prob"),
        ("pad_token_id", 500, "pad_token_id"),
        ("vocab_size", 0, "vocab_size"),
        ("bialibi_global_keys", 0, "bialibi_global_keys must be an integer >= 1"),
        ("bialibi_global_keys", 10_000, "bialibi_global_keys .* must be <= block_size"),
        ("bialibi_init", "random", "bialibi_init must be one of .*use 'alibi'"),
    ],
)
def test_invalid_config_values_raise_before_any_module_is_built(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**{field: value})


def test_bialibi_slopes_start_at_alibi_and_stay_non_negative():
    from littlebird_ds.model.bialibi import BiALiBi, alibi_slopes

    assert alibi_slopes(4) == [0.25, 0.0625, 0.015625, 0.00390625]
    assert len(alibi_slopes(6)) == 6 and alibi_slopes(6)[:4] == alibi_slopes(4)
    m = BiALiBi(6)
    torch.testing.assert_close(m.slopes()[0], torch.tensor(alibi_slopes(6)))
    with torch.no_grad():
        m.beta_raw.fill_(-50.0)
    assert (m.slopes()[1] >= 0).all()
    a, b, g = m.slopes(2, 3)  # tensor/sequence-parallel ranks slice by global head id
    torch.testing.assert_close(a, torch.tensor(alibi_slopes(6)[2:5]))


def test_directional_init_starts_the_steepest_quarter_looking_left_and_the_next_quarter_right():
    from littlebird_ds.model.bialibi import ONE_SIDED_EXTRA_SLOPE, BiALiBi, alibi_slopes

    m = torch.tensor(alibi_slopes(8))
    alpha, beta, gamma = BiALiBi(8, init="directional").slopes()
    torch.testing.assert_close(alpha, m)  # [CLS] and the global keys keep the ALiBi slope
    extra = torch.zeros(8)
    extra[:2] = ONE_SIDED_EXTRA_SLOPE  # heads 0-1, the steepest: keys on the right fade fast
    torch.testing.assert_close(gamma, m + extra)
    torch.testing.assert_close(beta, m + extra.roll(2))  # heads 2-3 look right
    assert (beta[4:] == gamma[4:]).all()  # the rest stay symmetric
    # One head: it looks left; "alibi" is the spec's symmetric start.
    a1, b1, g1 = BiALiBi(1, init="directional").slopes()
    assert g1.item() > b1.item() == a1.item()
    for t in zip(BiALiBi(8).slopes(), (m, m, m)):
        torch.testing.assert_close(*t)


def test_a_model_with_directional_init_starts_there_and_keeps_the_setting_when_saved(tmp_path):
    from littlebird_ds.model.bialibi import initial_slopes

    model = lb.LittleBirdForQuestionAnswering(tiny_config(bialibi_init="directional"))
    want = [s.float() for s in initial_slopes(model.config.num_attention_heads, "directional")]
    for layer in model.littlebird.layers:
        for got, w in zip(layer.attention.bialibi.slopes(), want):
            torch.testing.assert_close(got, w)
    model.save_pretrained(tmp_path)
    assert lb.LittleBirdConfig.from_pretrained(tmp_path).bialibi_init == "directional"


def test_masked_logits_only_gives_the_same_loss_and_the_selected_logits():
    model = lb.LittleBirdForMaskedLM(tiny_config()).eval()
    ids = _ids(2, 40)
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.3, ids, torch.full_like(ids, -100))
    full = model(ids, labels=labels)
    sparse = model(ids, labels=labels, masked_logits_only=True)
    torch.testing.assert_close(sparse.loss, full.loss)
    torch.testing.assert_close(sparse.logits, full.logits[labels != -100])
    with pytest.raises(ValueError, match="needs labels"):
        model(ids, masked_logits_only=True)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "gelu_new", "relu"])
def test_feed_forward_keeps_its_activation_input_only_and_gradients_are_unchanged(act):
    from littlebird_ds.model.layers import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(tiny_config(hidden_act=act)).train()
    x = torch.randn(2, 30, 24, requires_grad=True)

    def run(recompute):
        ffn.zero_grad()
        x.grad = None
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = ffn(x, recompute_activation=recompute)
        (y * torch.linspace(-1, 1, 24)).sum().backward()
        wide = sum(t.numel() == 2 * 30 * 48 for t in saved)  # [B, l, f] tensors kept for backward
        return y.detach(), [x.grad.clone()] + [p.grad.clone() for p in ffn.parameters()], wide

    y1, g1, wide1 = run(True)
    y0, g0, wide0 = run(False)
    assert wide1 == 1 and wide0 >= 2, (wide1, wide0)  # h only, against h and act(h) (or more)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("heads,checkpointing", [(3, False), (1, False), (3, True)])
def test_blocked_kernel_model_equals_eager_kernel_model_in_outputs_and_gradients(monkeypatch, heads, checkpointing):
    """The model's q, k, v are head views of the projections (strided), which the blocked
    kernel reads its windows from without copying; the eager kernel is the reference. Three
    layers share the blocked kernel's scratch buffers: a saved or returned tensor left in one
    (one head makes the head merge a no-op; checkpointing replays forwards inside backward)
    would be overwritten by the next layer and break the gradients."""
    from littlebird_ds.model.attention import blocked

    monkeypatch.setattr(blocked, "_STRIDED_MIN_TOKENS", 0)  # strided windows at this short length too
    ids = _ids(2, 100)  # same length: every interior window comes from the strided view
    results = []
    for kernel in ("eager", "blocked"):
        torch.manual_seed(0)
        model = lb.LittleBirdModel(tiny_config(attention_kernel=kernel, num_attention_heads=heads, num_hidden_layers=3))
        if checkpointing:
            model.gradient_checkpointing_enable()
        out = model(input_ids=ids).last_hidden_state
        out.pow(2).mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cpu_dropout_drops_at_rate_p_scales_the_kept_and_backpropagates_through_the_same_mask():
    from littlebird_ds.model.layers import Dropout

    drop = Dropout(0.3)
    x = torch.randn(400, 500, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    keep = y != 0
    assert abs(keep.float().mean().item() - 0.7) < 0.005  # 200k draws: 5 standard deviations is 0.005
    torch.testing.assert_close(y[keep], x[keep] / 0.7)
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * keep / 0.7)
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the default generator: seeded runs (and checkpoint replays) repeat
    assert torch.equal(drop.eval()(x), x)
