"""generate() with segment steps (`segment_length` K > 1, docs/design.md#segment-steps): the cache carries the state
and the partial segment, and token-by-token generation equals one teacher-forced forward, position by position.
"""

import pytest
import torch
from conftest import randomize, tiny_model, tiny_tokenizer
from reference import reference_sequence
from transformers import TextStreamer

pytestmark = pytest.mark.usefixtures("one_thread")

K = 4


def sharp_model(seed=0, **overrides):
    overrides = {"segment_length": K, "eos_token_id": None, **overrides}
    return randomize(tiny_model(seed, **overrides), seed=seed).double()


def prompts(batch, length, seed=0):
    return torch.randint(1, 59, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, input_ids, new_tokens, **kwargs):
    return model.generate(
        input_ids,
        max_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


@pytest.mark.parametrize("state_update", ["replace", "addressed"])
@pytest.mark.parametrize("rebias", [True, False])
@pytest.mark.parametrize("prompt_length", [1, K - 1, K, K + 1, 2 * K + 3])
def test_token_by_token_generation_equals_one_teacher_forced_forward(prompt_length, rebias, state_update):
    # the bug class transformers#46032 fixed for Mamba: the decode path and the forward must agree at every position
    model = sharp_model(rebias=rebias, state_update=state_update)
    new = 3 * K + 1
    out = greedy(model, prompts(2, prompt_length, seed=prompt_length), new)
    decoded = torch.stack(out.logits, dim=1).double()
    forced = model(out.sequences[:, :-1]).logits[:, prompt_length - 1 :]
    for position in range(new):
        torch.testing.assert_close(decoded[:, position], forced[:, position], rtol=1e-6, atol=1e-6)
    # and both equal the float64 definition
    ref_logits, _ = reference_sequence(model.state_dict(), model.config, out.sequences[:, :-1])
    torch.testing.assert_close(decoded, ref_logits[:, prompt_length - 1 :], rtol=1e-6, atol=1e-6)
    assert len(set(out.sequences[:, prompt_length:].flatten().tolist())) >= 4, "degenerate test model"


def test_the_cache_holds_the_state_and_the_partial_segment():
    model = sharp_model()
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((args[0].shape[1], output.cache))

    handle = model.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        out = greedy(model, prompts(2, 6), 9)
    finally:
        handle.remove()
    assert [steps for steps, _ in calls] == [6] + [1] * 8  # the prompt, then one token per call
    held = [0 if cache.pending is None else cache.pending.shape[1] for _, cache in calls]
    assert held == [(6 + i) % K for i in range(9)]  # the partial segment grows, and is written when complete
    assert out.cache.get_seq_length() == 6 + 9 - 1


def test_greedy_without_cache_equals_cached():
    model = sharp_model()
    input_ids = prompts(3, 5, seed=1)
    cached = greedy(model, input_ids, 10)
    recomputed = greedy(model, input_ids, 10, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), rtol=1e-10, atol=1e-10)


def test_sampling_and_beams_with_cache_equal_recompute():
    model = sharp_model()
    input_ids = prompts(2, 3, seed=2)
    samples = dict(max_new_tokens=10, do_sample=True, top_k=0, temperature=1.3, num_return_sequences=3)
    torch.manual_seed(3)
    cached = model.generate(input_ids, **samples)
    torch.manual_seed(3)
    assert torch.equal(cached, model.generate(input_ids, use_cache=False, **samples))
    assert len({tuple(row) for row in cached[:3, 3:].tolist()}) > 1
    beams = dict(max_new_tokens=9, num_beams=4, num_return_sequences=2, do_sample=False)
    beams.update(return_dict_in_generate=True, output_scores=True)
    cached = model.generate(input_ids, **beams)
    recomputed = model.generate(input_ids, use_cache=False, **beams)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, rtol=1e-10, atol=1e-10)
    assert (cached.beam_indices[:, :9] != cached.beam_indices[:, :1]).any()  # the beams really were reordered


def test_left_padded_batch_equals_one_at_a_time():
    model = sharp_model()
    tok = tiny_tokenizer()
    texts = ["w3 w14 w15", "w9 w2 w6 w5 w35 w8", "w1"]
    batch = tok(texts, padding=True, return_tensors="pt")
    batched = greedy(model, batch["input_ids"], 9, attention_mask=batch["attention_mask"], pad_token_id=60)
    width = batch["input_ids"].shape[1]
    for row, text in enumerate(texts):
        alone = greedy(model, tok(text, return_tensors="pt")["input_ids"], 9)
        length = alone.sequences.shape[1] - 9
        assert torch.equal(batched.sequences[row, width:], alone.sequences[0, length:])
        torch.testing.assert_close(
            torch.stack(batched.logits)[:, row], torch.stack(alone.logits)[:, 0], rtol=1e-10, atol=1e-10
        )
    beams = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=60)
    batched = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **beams)
    alone = model.generate(tok(texts[0], return_tensors="pt")["input_ids"], **beams)
    assert torch.equal(batched[:2, width:], alone[:, 3:])


@pytest.mark.parametrize("more", [0, 1, K + 2])
def test_continue_from_returned_cache(more):
    model = sharp_model()
    first = greedy(model, prompts(2, 5, seed=4), 6)
    full = torch.cat([first.sequences, prompts(2, more, seed=5)], dim=1)
    continued = model.generate(full, cache=first.cache, max_new_tokens=7, do_sample=False)
    assert torch.equal(continued, model.generate(full, max_new_tokens=7, do_sample=False))
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    assert torch.equal(model.generate(full, cache=first.cache, **beams), model.generate(full, **beams))


def test_continue_from_past_hidden_states_at_a_segment_boundary():
    model = sharp_model()
    prompt, more = prompts(2, 2 * K, seed=6), prompts(2, 3, seed=7)
    state = model(prompt).past_hidden_states
    continued = model.generate(more, past_hidden_states=state, max_new_tokens=8, do_sample=False)
    whole = model.generate(torch.cat([prompt, more], dim=1), max_new_tokens=8, do_sample=False)
    assert torch.equal(continued[:, 3:], whole[:, 2 * K + 3 :])


def test_text_streamer_prints_the_generated_text(capsys):
    model = sharp_model()
    tok = tiny_tokenizer()
    inputs = tok("w5 w6 w7", return_tensors="pt")
    capsys.readouterr()
    out = model.generate(**inputs, max_new_tokens=9, do_sample=False, streamer=TextStreamer(tok, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.strip() == tok.decode(out[0, 3:]).strip() and len(printed.split()) == 9


def test_a_decoded_token_costs_one_position_and_the_write_slots_run_once_per_segment(monkeypatch):
    # the cache keeps each block's keys and values of the read slots and the segment's tokens
    model = sharp_model()
    M = model.config.state_size
    windows, extended = [], []
    block = model.transformer.h[0]
    block.register_forward_pre_hook(lambda module, args: windows.append(args[0].shape[1]))
    extend = block.extend
    monkeypatch.setattr(block, "extend", lambda x, *rest: extended.append(x.shape[1]) or extend(x, *rest))
    prompt, new = 6, 11
    greedy(model, prompts(1, prompt), new)
    assert windows == [2 * M + K] * 2  # the prompt: its two segments (the second partial) as whole windows
    # then per token: 1 position; M read slots when a segment starts, M write slots when it completes; after the
    # prompt, the keys and values of its partial segment (M read slots and 2 tokens) are built once
    expected = [M, 2, 1]  # token 7: read slots, the 2 tokens held, the token (3 of 4 held)
    for position in range(prompt + 2, prompt + new):  # tokens 8 .. 16
        held_before = (position - 1) % K
        expected += ([M] if held_before == 0 else []) + [1] + ([M] if held_before == K - 1 else [])
    assert extended == expected


def test_decoding_follows_the_attention_implementation(monkeypatch):
    import modeling_gptb.modeling_gptb as modeling

    model = sharp_model()
    input_ids = prompts(2, 5, seed=8)
    sdpa = greedy(model, input_ids, 7)
    calls = []
    eager = modeling.eager_attention_forward
    monkeypatch.setattr(
        modeling, "eager_attention_forward", lambda *a, **k: calls.append(a[1].shape) or eager(*a, **k)
    )
    model.set_attn_implementation("eager")
    written_out = greedy(model, input_ids, 7)
    assert any(query_shape[2] == 1 for query_shape in calls)  # the one-position decode steps too
    assert torch.equal(written_out.sequences, sdpa.sequences)
    torch.testing.assert_close(torch.stack(written_out.logits), torch.stack(sdpa.logits), rtol=1e-10, atol=1e-10)


def test_generate_from_inputs_embeds_and_with_hidden_states():
    model = sharp_model(state_update="selective")
    input_ids = prompts(2, 6, seed=9)
    from_ids = model.generate(input_ids, max_new_tokens=7, do_sample=False)
    embeds = model.transformer.wte(input_ids).detach()
    assert torch.equal(model.generate(inputs_embeds=embeds, max_new_tokens=7, do_sample=False), from_ids[:, 6:])
    # hidden states asked for in generate take the window path; the tokens are the same
    out = model.generate(
        input_ids, max_new_tokens=7, do_sample=False, output_hidden_states=True, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, from_ids) and len(out.hidden_states) == 7


def test_a_left_padded_batch_decodes_from_keys_and_values_too(monkeypatch):
    # rows at different places in their segments: no whole window after the prompt, and the result of one at a time
    model = sharp_model(state_update="addressed")
    input_ids = torch.tensor([[60, 60, 60, 4, 9], [60, 11, 2, 37, 5], [8, 6, 7, 3, 1]])
    mask = (input_ids != 60).long()
    windows, rows_steps = [], []
    model.transformer.h[0].register_forward_pre_hook(lambda module, args: windows.append(args[0].shape[1]))
    decode = model.transformer._decode_token_rows
    monkeypatch.setattr(model.transformer, "_decode_token_rows", lambda *a: rows_steps.append(1) or decode(*a))
    batched = greedy(model, input_ids, 10, attention_mask=mask, pad_token_id=60)
    assert len(windows) == 2 and len(rows_steps) == 9  # the prompt's windows, then one decode step per token
    for row in range(3):
        alone = greedy(model, input_ids[row : row + 1, mask[row].bool()], 10)
        assert torch.equal(batched.sequences[row, 5:], alone.sequences[0, int(mask[row].sum()) :])
        torch.testing.assert_close(
            torch.stack(batched.logits)[:, row], torch.stack(alone.logits)[:, 0], rtol=1e-10, atol=1e-10
        )
