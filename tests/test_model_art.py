"""The ART memory inside GPTB: what it is fed, when it learns, the coupled loss, the gate and persistence."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from modeling_gptb import GPTBLMHeadModel
from modeling_gptb.art_memory import ARTMemory, ARTStatus


def art_model(**overrides):
    return tiny_model(**{"art_enabled": True, "art_vigilance": 0.95, **overrides})


def tokens(batch=4, steps=6, seed=0):
    return torch.randint(0, 60, (batch, steps), generator=torch.Generator().manual_seed(seed))


def fresh_memory(model):
    c = model.config
    return ARTMemory(c.n_embd, rule=c.art_rule, vigilance=c.art_vigilance, beta=c.art_beta, alpha=c.art_alpha)


@pytest.mark.parametrize("segment_length", [1, 4])  # pooled over the token positions, never the state slots
@pytest.mark.parametrize("pooling", ["mean", "state", "last"])
def test_training_forward_feeds_the_pooled_valid_steps(pooling, segment_length):
    model = art_model(art_pooling=pooling, segment_length=segment_length).train()
    x = tokens()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = model(x, attention_mask=mask)
    with torch.no_grad():
        body = model.transformer(x, attention_mask=mask)
    if pooling == "mean":  # mean over the valid steps only
        expected = torch.stack([body.last_hidden_state[b, mask[b].bool()].mean(0) for b in range(4)])
    elif pooling == "state":
        expected = body.past_hidden_states.mean(1)
    else:
        expected = body.last_hidden_state[:, -1]
    reference = fresh_memory(model)
    ref = reference.update(expected)
    assert torch.equal(out.art_category, ref.category) and torch.equal(out.art_status, ref.status)
    torch.testing.assert_close(model.art_memory.prototypes, reference.prototypes)
    assert out.art_novelty.shape == (4,)


def test_eval_mode_does_not_learn_unless_asked():
    model = art_model().train()
    model(tokens(seed=1))
    before = {k: v.clone() for k, v in model.art_memory.state_dict().items()}
    model.eval()
    out = model(tokens(seed=2))
    assert out.art_category is None
    read = model(tokens(seed=2), art_mode="classify")
    assert read.art_category.shape == (4,)
    for key, value in model.art_memory.state_dict().items():
        assert torch.equal(value, before[key]), key
    model(tokens(seed=2), art_mode="update")
    assert model.art_memory.num_categories > before["num_committed"].item()
    learner = art_model(art_learn_in_eval=True).eval()
    learner(tokens(seed=3))
    assert learner.art_memory.num_categories > 0


def test_generation_does_not_touch_the_memory():
    model = art_model().eval()
    model.generate(tokens(2, 3), max_new_tokens=5, do_sample=False)
    assert model.art_memory.num_categories == 0


def test_art_mode_is_checked():
    with pytest.raises(ValueError, match="art_mode must be 'update', 'classify' or 'off'"):
        art_model()(tokens(), art_mode="learn")


def test_coupled_loss_reaches_the_model_never_the_prototypes():
    x = tokens(seed=4)
    grads = {}
    for weight in (0.0, 1.0):
        # low vigilance: x resonates with categories made from other sequences, so there is a pull
        model = art_model(art_loss_weight=weight, art_vigilance=0.3, seed=5).train()
        model(tokens(seed=9))
        prototypes = model.art_memory.weight.clone()
        out = model(x, labels=x)
        memory_after_update = model.art_memory.weight.clone()
        out.loss.backward()
        grads[weight] = model.transformer.h[0].mlp.c_fc.weight.grad.clone()
        assert not any(p.requires_grad for p in model.art_memory.buffers())
        assert list(model.art_memory.parameters()) == []
        assert torch.equal(model.art_memory.weight, memory_after_update)  # backward changed nothing there
        assert not torch.equal(prototypes, memory_after_update)  # the ART rule did learn
        assert (out.art_status == int(ARTStatus.RESONATED)).any()
    assert not torch.allclose(grads[0.0], grads[1.0])


def test_coupled_loss_value_matches_the_definition():
    model = art_model(art_loss_weight=0.5, seed=6).train()
    x = tokens(seed=6)
    model(x)  # every row now has a category; the same batch resonates
    with torch.no_grad():
        pooled = model.transformer(x).last_hidden_state.mean(1)
    out = model(x, labels=x)
    prototypes = model.art_memory.weight[out.art_category]
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 61), x[:, 1:].reshape(-1))
    expected = lm + 0.5 * (1 - F.cosine_similarity(pooled, prototypes.float(), dim=-1)).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_gate_zero_gives_resonated_sequences_zero_gradient():
    model = art_model(art_resonated_weight=0.0, seed=7).train()
    seen = tokens(2, 6, seed=10)
    model(seen)  # the memory now knows these two sequences
    batch = torch.cat([seen, tokens(2, 6, seed=11)])
    embeds = model.transformer.wte(batch).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=batch)
    assert out.art_status.tolist()[:2] == [int(ARTStatus.RESONATED)] * 2
    assert (out.art_status[2:] == int(ARTStatus.NEW)).all()
    out.loss.backward()
    per_sequence = embeds.grad.abs().sum(dim=(1, 2))
    assert (per_sequence[:2] == 0).all() and (per_sequence[2:] > 0).all()


def test_gate_one_is_the_plain_loss():
    model = art_model(seed=8).train()
    x = tokens(seed=12)
    out = model(x, labels=x)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, :-1].reshape(-1, 61), x[:, 1:].reshape(-1)))


def test_fuzzy_rule_sees_squashed_inputs():
    model = art_model(art_rule="fuzzy", art_vigilance=0.8).train()
    out = model(tokens(seed=13))
    assert model.art_memory.num_categories >= 1 and out.art_status.shape == (4,)
    assert model.art_memory.prototypes.shape[1] == 2 * 32  # complement coded
    assert (model.art_memory.prototypes >= 0).all() and (model.art_memory.prototypes <= 1).all()


def test_memory_saved_beside_the_weights_and_restored(tmp_path):
    model = art_model().train()
    model(tokens(seed=14))
    model(tokens(seed=15))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "art_memory.safetensors").is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = GPTBLMHeadModel.from_pretrained(tmp_path)
    assert loaded.art_memory.num_categories == model.art_memory.num_categories
    assert torch.equal(loaded.art_memory.prototypes, model.art_memory.prototypes)
    assert torch.equal(loaded.art_memory.counts, model.art_memory.counts)


def test_memory_file_is_authoritative_over_the_weights_file(tmp_path):
    model = art_model().train()
    model(tokens(seed=16))
    model.save_pretrained(tmp_path)
    model(tokens(seed=17))  # the memory grows after the weights were written
    model.art_memory.save_pretrained(tmp_path)
    loaded = GPTBLMHeadModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.art_memory.prototypes, model.art_memory.prototypes)


def test_memory_lives_in_the_state_dict_for_trainer_resume():
    model = art_model().train()
    model(tokens(seed=18))
    fresh = art_model(seed=1)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.art_memory.prototypes, model.art_memory.prototypes)
    assert fresh.art_memory.num_categories == model.art_memory.num_categories


def test_gpt2_warm_start_gives_an_empty_memory(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=80, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        tmp_path
    )
    model = GPTBLMHeadModel.from_pretrained(tmp_path, state_size=4, art_enabled=True, art_max_categories=16)
    assert model.art_memory.num_categories == 0
    assert (model.art_memory.weight == 0).all() and (model.art_memory.category_counts == 0).all()
    model.train()(torch.randint(0, 80, (2, 5)))
    assert model.art_memory.num_categories >= 1
