"""generate() on GPTB: the recurrent state is the cache (docs/design.md#chunking-and-the-generation-cache).

References are independent of the model's code: a greedy loop over the float64 step written from the definition
(tests/reference.py), and `generate(use_cache=False)`, which re-reads the whole sequence from the initial state at
every step instead of carrying the state.
"""

import threading
from contextlib import contextmanager

import pytest
import torch
from conftest import randomize, tiny_model, tiny_tokenizer
from reference import reference_sequence, reference_step
from transformers import GenerationConfig, TextIteratorStreamer, TextStreamer, pipeline

from modeling_gptb import GPTBCache

pytestmark = pytest.mark.usefixtures("one_thread")

M, D, V = 3, 32, 61


def sharp_model(seed=0, **overrides):
    """A float64 tiny model with weights large enough that greedy decoding wanders over many tokens."""
    return randomize(tiny_model(seed, **overrides), seed=seed).double()


def prompts(batch, length, seed=0):
    return torch.randint(1, 59, (batch, length), generator=torch.Generator().manual_seed(seed))


@contextmanager
def record_calls(model):
    """Record, for every call of the GPTB body, the number of tokens fed and the shape of the state it started from,
    and the width of every window the blocks saw."""
    calls, windows = [], []

    def body_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        steps = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        cache = kwargs.get("cache")
        state = cache.state if isinstance(cache, GPTBCache) else kwargs.get("past_hidden_states")
        calls.append((steps, None if state is None else tuple(state.shape)))

    def block_hook(module, args):
        windows.append(args[0].shape[1])

    handles = [model.transformer.register_forward_pre_hook(body_hook, with_kwargs=True)]
    handles += [block.register_forward_pre_hook(block_hook) for block in model.transformer.h]
    try:
        yield calls, windows
    finally:
        for handle in handles:
            handle.remove()


def reference_greedy(model, input_ids, new_tokens, state=None):
    """Greedy decoding written in the test: the float64 reference step, argmax, feed it back."""
    params, config = model.state_dict(), model.config
    logits, state = reference_sequence(params, config, input_ids, state)
    step_logits = logits[:, -1]
    tokens, all_logits = [], []
    for _ in range(new_tokens):
        all_logits.append(step_logits)
        token = step_logits.argmax(-1)
        tokens.append(token)
        step_logits, state = reference_step(params, config, state, token)
    return torch.stack(tokens, dim=1), torch.stack(all_logits, dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# Greedy


@pytest.mark.smoke
@pytest.mark.parametrize("rebias", [True, False])
def test_greedy_equals_reference_greedy_loop(rebias):
    model = sharp_model(rebias=rebias, eos_token_id=None)
    input_ids = prompts(2, 5)
    out = model.generate(
        input_ids, max_new_tokens=16, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    ref_tokens, ref_logits = reference_greedy(model, input_ids, 16)
    assert torch.equal(out.sequences[:, :5], input_ids)
    assert torch.equal(out.sequences[:, 5:], ref_tokens)
    # generate() hands logits out in float32 whatever the model's dtype
    torch.testing.assert_close(torch.stack(out.logits, dim=1).double(), ref_logits, rtol=1e-6, atol=1e-6)
    assert len(set(ref_tokens.flatten().tolist())) >= 4, "degenerate test model: greedy output barely moves"


def test_greedy_without_cache_equals_cached():
    model = sharp_model(eos_token_id=None)
    input_ids = prompts(3, 4, seed=1)
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cached = model.generate(input_ids, **kwargs)
    with record_calls(model) as (calls, _):
        recomputed = model.generate(input_ids, use_cache=False, **kwargs)
    # the slow path really re-reads everything from the initial state at every step
    assert [steps for steps, _ in calls] == list(range(4, 4 + 12))
    assert all(state is None for _, state in calls)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), rtol=1e-10, atol=1e-10)


def test_float32_model_greedy_matches_reference_tokens():
    model = randomize(tiny_model(eos_token_id=None))
    input_ids = prompts(2, 5, seed=2)
    out = model.generate(
        input_ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    ref_tokens, ref_logits = reference_greedy(model, input_ids, 10)
    torch.testing.assert_close(torch.stack(out.logits, dim=1).double(), ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences[:, 5:], ref_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling and beam search


def test_seeded_sampling_with_cache_equals_without():
    model = sharp_model(eos_token_id=None)
    input_ids = prompts(2, 4, seed=3)
    kwargs = dict(max_new_tokens=12, do_sample=True, top_k=0, temperature=1.3, num_return_sequences=3)
    torch.manual_seed(1234)
    cached = model.generate(input_ids, **kwargs)
    torch.manual_seed(1234)
    recomputed = model.generate(input_ids, use_cache=False, **kwargs)
    assert cached.shape == (6, 16)
    assert torch.equal(cached, recomputed)
    # sampling really sampled: the three samples of a prompt are not all the same, and differ from greedy
    assert len({tuple(row) for row in cached[:3, 4:].tolist()}) > 1
    greedy = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    assert not torch.equal(cached[::3], greedy)


def test_sampling_draws_from_the_reference_distribution():
    """Sampling scores (before the draw) are the reference logits of the sampled prefix."""
    model = sharp_model(eos_token_id=None)
    input_ids = prompts(1, 3, seed=4)
    torch.manual_seed(7)
    out = model.generate(
        input_ids, max_new_tokens=8, do_sample=True, top_k=0, return_dict_in_generate=True, output_logits=True
    )
    ref_logits, _ = reference_sequence(model.state_dict(), model.config, out.sequences[:, :-1])
    torch.testing.assert_close(torch.stack(out.logits, dim=1).double(), ref_logits[:, 2:], rtol=1e-6, atol=1e-6)


@pytest.mark.smoke
@pytest.mark.parametrize("num_return_sequences", [1, 3])
def test_beam_search_with_cache_equals_recompute(num_return_sequences):
    model = sharp_model(eos_token_id=None)
    input_ids = prompts(2, 4, seed=5)
    kwargs = dict(
        max_new_tokens=10,
        num_beams=4,
        num_return_sequences=num_return_sequences,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    cached = model.generate(input_ids, **kwargs)
    recomputed = model.generate(input_ids, use_cache=False, **kwargs)
    assert cached.sequences.shape == (2 * num_return_sequences, 14)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, rtol=1e-10, atol=1e-10)
    # the beams really were reordered along the way (else a missing reorder_cache would go unnoticed)
    beams = cached.beam_indices[:, :10]
    assert (beams != beams[:, :1]).any()


def test_beam_search_scores_are_reference_log_probabilities():
    """With length_penalty 0 a finished beam's score is the sum of its tokens' log-probabilities: check it."""
    model = sharp_model(eos_token_id=None)
    input_ids = prompts(1, 4, seed=6)
    out = model.generate(
        input_ids,
        max_new_tokens=8,
        num_beams=3,
        num_return_sequences=3,
        length_penalty=0.0,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    for sequence, score in zip(out.sequences, out.sequences_scores, strict=True):
        logits, _ = reference_sequence(model.state_dict(), model.config, sequence[None, :-1])
        log_probs = logits[0, 3:].log_softmax(-1)
        expected = log_probs.gather(-1, sequence[4:, None]).sum()
        torch.testing.assert_close(score.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Long generation: the state is the cache, the work per token constant


def test_thousands_of_tokens_constant_state_and_one_token_per_step():
    model = tiny_model(eos_token_id=None)
    input_ids = prompts(2, 5, seed=7)
    new = 2000
    with record_calls(model) as (calls, windows):
        out = model.generate(input_ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 5 + new)
    assert len(calls) == new  # the prompt, then one call per further token
    assert calls[0] == (5, None)
    assert all(steps == 1 for steps, _ in calls[1:])
    assert all(state == (2, M, D) for _, state in calls[1:])
    assert set(windows) == {M + 1}  # every block call reads the same window, whatever the position
    assert len(windows) == model.config.n_layer * (5 + new - 1)
    cache = out.cache
    assert isinstance(cache, GPTBCache)
    assert cache.state.shape == (2, M, D)
    assert cache.get_seq_length() == 5 + new - 1  # the last token is returned, not yet consumed


# ---------------------------------------------------------------------------------------------------------------------
# Padding, continuation


def test_left_padded_batch_equals_one_at_a_time():
    model = sharp_model(eos_token_id=None)
    tok = tiny_tokenizer()
    texts = ["w3 w14 w15", "w9 w2 w6 w5 w35 w8", "w1"]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any() and batch["input_ids"][0, 0] == tok.pad_token_id
    kwargs = dict(max_new_tokens=9, do_sample=False, return_dict_in_generate=True, output_logits=True)
    batched = model.generate(**batch, pad_token_id=tok.pad_token_id, **kwargs)
    width = batch["input_ids"].shape[1]
    for row, text in enumerate(texts):
        alone = model.generate(**tok(text, return_tensors="pt"), **kwargs)
        length = alone.sequences.shape[1] - 9
        assert torch.equal(batched.sequences[row, width:], alone.sequences[0, length:])
        torch.testing.assert_close(
            torch.stack(batched.logits)[:, row], torch.stack(alone.logits)[:, 0], rtol=1e-10, atol=1e-10
        )


def test_left_padded_beam_search_equals_one_at_a_time():
    model = sharp_model(eos_token_id=None)
    input_ids = torch.tensor([[60, 60, 4, 9, 23], [11, 2, 37, 5, 6]])
    mask = (input_ids != 60).long()
    kwargs = dict(max_new_tokens=7, num_beams=3, num_return_sequences=2, do_sample=False)
    batched = model.generate(input_ids, attention_mask=mask, pad_token_id=60, **kwargs)
    first = model.generate(input_ids[:1, 2:], **kwargs)
    second = model.generate(input_ids[1:], **kwargs)
    assert torch.equal(batched[:2, 5:], first[:, 3:])
    assert torch.equal(batched[2:, 5:], second[:, 5:])


@pytest.mark.smoke
@pytest.mark.parametrize("pass_attention_mask", [False, True])
def test_continue_from_returned_cache_with_full_sequence(pass_attention_mask):
    model = sharp_model(eos_token_id=None)
    input_ids = prompts(2, 4, seed=8)
    first = model.generate(input_ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert first.cache.get_seq_length() == 8
    more = torch.tensor([[13, 17], [19, 23]])
    full = torch.cat([first.sequences, more], dim=1)
    extra = {"attention_mask": torch.ones_like(full)} if pass_attention_mask else {}
    with record_calls(model) as (calls, _):
        continued = model.generate(full, cache=first.cache, max_new_tokens=6, do_sample=False, **extra)
    # only what the state has not consumed is fed: the last generated token and the two new ones
    assert calls[0] == (3, (2, M, D))
    assert all(steps == 1 for steps, _ in calls[1:])
    whole = model.generate(full, max_new_tokens=6, do_sample=False)
    assert torch.equal(continued, whole)
    ref_tokens, _ = reference_greedy(model, full, 6)
    assert torch.equal(continued[:, full.shape[1] :], ref_tokens)


def test_continue_from_returned_cache_with_beams_and_samples():
    """generate() repeats tensors for beams / num_return_sequences, not a cache object: the model repeats its cache."""
    model = sharp_model(eos_token_id=None)
    input_ids = prompts(2, 4, seed=13)
    first = model.generate(input_ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = first.cache
    state_before = cache.state.clone()
    full = torch.cat([first.sequences, torch.tensor([[21], [22]])], dim=1)
    beams = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    continued = model.generate(full, cache=cache, **beams)
    assert torch.equal(continued, model.generate(full, **beams))
    samples = dict(max_new_tokens=6, do_sample=True, top_k=0, num_return_sequences=3)
    torch.manual_seed(11)
    continued = model.generate(full, cache=cache, **samples)
    torch.manual_seed(11)
    assert torch.equal(continued, model.generate(full, **samples))
    # the caller's cache is not consumed: it can be continued from again
    assert torch.equal(cache.state, state_before) and cache.get_seq_length() == 6


def test_continue_left_padded_batch_from_returned_cache():
    model = sharp_model(eos_token_id=None)
    input_ids = torch.tensor([[60, 60, 4, 9], [11, 2, 37, 5]])
    mask = (input_ids != 60).long()
    first = model.generate(
        input_ids,
        attention_mask=mask,
        pad_token_id=60,
        max_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
    )
    full = torch.cat([first.sequences, torch.tensor([[7, 8], [9, 10]])], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, full.shape[1] - 4, dtype=torch.long)], dim=1)
    continued = model.generate(
        full,
        attention_mask=full_mask,
        cache=first.cache,
        pad_token_id=60,
        max_new_tokens=5,
        do_sample=False,
    )
    whole = model.generate(full, attention_mask=full_mask, pad_token_id=60, max_new_tokens=5, do_sample=False)
    assert torch.equal(continued, whole)


@pytest.mark.parametrize("use_cache", [True, False])
def test_continue_from_past_hidden_states_with_only_new_tokens(use_cache):
    model = sharp_model(eos_token_id=None)
    prompt, more = prompts(2, 5, seed=9), prompts(2, 3, seed=10)
    state = model(prompt).past_hidden_states
    continued = model.generate(more, past_hidden_states=state, max_new_tokens=8, do_sample=False, use_cache=use_cache)
    whole = model.generate(torch.cat([prompt, more], dim=1), max_new_tokens=8, do_sample=False)
    assert torch.equal(continued[:, 3:], whole[:, 8:])
    ref_tokens, _ = reference_greedy(model, more, 8, state=state)
    assert torch.equal(continued[:, 3:], ref_tokens)


def test_continue_from_past_hidden_states_with_beams_and_samples():
    model = sharp_model(eos_token_id=None)
    prompt, more = prompts(2, 5, seed=11), prompts(2, 2, seed=12)
    state = model(prompt).past_hidden_states
    whole_ids = torch.cat([prompt, more], dim=1)
    beams = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    continued = model.generate(more, past_hidden_states=state, **beams)
    whole = model.generate(whole_ids, **beams)
    assert torch.equal(continued[:, 2:], whole[:, 7:])
    samples = dict(max_new_tokens=6, do_sample=True, top_k=0, num_return_sequences=2)
    torch.manual_seed(5)
    continued = model.generate(more, past_hidden_states=state, **samples)
    torch.manual_seed(5)
    whole = model.generate(whole_ids, **samples)
    assert torch.equal(continued[:, 2:], whole[:, 7:])


def test_generate_from_inputs_embeds_equals_from_ids():
    model = sharp_model(eos_token_id=None)
    input_ids = prompts(2, 5, seed=14)
    embeds = model.transformer.wte(input_ids).detach()
    from_ids = model.generate(input_ids, max_new_tokens=8, do_sample=False)
    from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, 5:])  # with only embeddings in, only the new tokens come out


# ---------------------------------------------------------------------------------------------------------------------
# Streamers, pipeline, assisted decoding


def test_text_streamer_prints_the_generated_text(capsys):
    model = sharp_model(eos_token_id=None)
    tok = tiny_tokenizer()
    inputs = tok("w5 w6 w7", return_tensors="pt")
    capsys.readouterr()
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, streamer=TextStreamer(tok, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.strip() == tok.decode(out[0, 3:]).strip()
    assert len(printed.split()) == 8


def test_text_iterator_streamer_yields_the_generated_text():
    model = sharp_model(eos_token_id=None)
    tok = tiny_tokenizer()
    inputs = tok("w5 w6 w7", return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    result = {}

    def run():
        result["out"] = model.generate(**inputs, max_new_tokens=8, do_sample=False, streamer=streamer)

    thread = threading.Thread(target=run)
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert len(pieces) > 1  # streamed, not delivered at the end in one piece
    assert "".join(pieces).strip() == tok.decode(result["out"][0, 3:]).strip()


@pytest.mark.smoke
def test_text_generation_pipeline():
    model = sharp_model(eos_token_id=None)
    tok = tiny_tokenizer()
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    prompt = "w4 w8 w15 w16"
    ref_tokens, _ = reference_greedy(model, torch.tensor([[4, 8, 15, 16]]), 7)
    new_text = tok.decode(ref_tokens[0], skip_special_tokens=True)  # the pipeline's decoding of the new tokens
    result = generator(prompt, max_new_tokens=7, do_sample=False)
    assert result[0]["generated_text"] == prompt + new_text
    new_only = generator(prompt, max_new_tokens=7, do_sample=False, return_full_text=False)
    assert new_only[0]["generated_text"] == new_text
    tensors = generator(prompt, max_new_tokens=7, do_sample=False, return_tensors=True)
    assert list(tensors[0]["generated_token_ids"]) == [4, 8, 15, 16, *ref_tokens[0].tolist()]


@pytest.mark.smoke
@pytest.mark.parametrize(
    "assisting",
    [{"assistant_model": "model"}, {"prompt_lookup_num_tokens": 2}, {"generation_config": "prompt_lookup"}],
    ids=["assistant_model", "prompt_lookup", "prompt_lookup_in_config"],
)
def test_assisted_decoding_is_refused_for_a_stateful_model(assisting):
    # GPTB refuses before transformers decides, so the error is the same on every supported transformers version.
    model = tiny_model()
    assert model._is_stateful
    if assisting.get("assistant_model"):
        assisting = {"assistant_model": tiny_model(seed=1)}
    if assisting.get("generation_config"):
        assisting = {"generation_config": GenerationConfig(prompt_lookup_num_tokens=2, max_new_tokens=3)}
    with pytest.raises(ValueError, match="stateful .*assisted decoding"):
        model.generate(prompts(1, 3), max_new_tokens=3, do_sample=False, **assisting)


@pytest.mark.smoke
def test_past_key_values_has_one_deprecation_with_one_removal_version():
    # Issue 20 item 6: forward said 5.40.0 and generate (transformers' own) 6.0.0. Now each call warns once, with the
    # same message and version, and the old name still continues from the returned state.
    import warnings

    model = sharp_model(eos_token_id=None)
    first = model.generate(prompts(1, 4), max_new_tokens=3, return_dict_in_generate=True)
    follow_up = torch.cat([first.sequences, torch.tensor([[7]])], 1)
    messages = []
    for call in (
        lambda cache: model(follow_up[:, -1:], past_key_values=cache),
        lambda cache: model.generate(follow_up, past_key_values=cache, max_new_tokens=2),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(GPTBCache(first.cache.state.clone(), first.cache.seq_length))
        deprecations = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
        assert len(deprecations) == 1, deprecations
        messages.append(deprecations[0].split(" for ")[0])
    assert messages[0] == messages[1] == "`past_key_values` is deprecated and will be removed in version 6.0.0"
    expected = model.generate(follow_up, cache=first.cache, max_new_tokens=2)
    assert torch.equal(model.generate(follow_up, past_key_values=first.cache, max_new_tokens=2), expected)
