"""Rollouts: the padded layout of sampled answers, their per-token log-probabilities against
each row scored alone, DPO's summed log-probabilities and transformers on the same weights."""

import pytest
import torch
from test_generation import CFG, CountingModel
from test_generation_batches import prompts_of_lengths

from minigpt.finetuning.reference import sequence_logprobs
from minigpt.finetuning.rollout import Rollout, RolloutSettings, answer_logprobs, sample_rollouts
from minigpt.generation.batch import generate_batch
from minigpt.models.gpt2.model import GPTModel

EOS = 9


@pytest.fixture
def model():
    torch.manual_seed(1)
    return GPTModel(CFG)


def test_answers_start_at_one_column_and_the_masks_select_them():
    # After id t greedy decoding picks t + 1, so from 6 the answer is 7 8 9 (9 ends it).
    counting = CountingModel(CFG)
    settings = RolloutSettings(max_new_tokens=4, temperature=0.0, eos_id=EOS)
    rollout = sample_rollouts(counting, [[1, 2, 6], [3], [40, 41]], settings)
    assert rollout.prompt_width == 3
    assert rollout.ids.tolist() == [[1, 2, 6, 7, 8, 9, 0], [0, 0, 3, 4, 5, 6, 7], [0, 40, 41, 42, 43, 44, 45]]
    assert rollout.answers() == [[7, 8, 9], [4, 5, 6, 7], [42, 43, 44, 45]]
    assert rollout.ended.tolist() == [True, False, False]  # only the first reached end-of-text
    assert rollout.prompt_lengths.tolist() == [3, 1, 2]
    assert rollout.answer_mask.tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]]
    assert rollout.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]]
    assert rollout.last_index.tolist() == [5, 6, 6]


def test_sampled_answers_are_generate_batch_with_the_same_seed(model):
    prompts = prompts_of_lengths(4, 1, 6, seed=2)
    settings = RolloutSettings(max_new_tokens=5, temperature=1.0, top_k=20, eos_id=EOS)
    torch.manual_seed(7)
    rollout = sample_rollouts(model, prompts, settings)
    torch.manual_seed(7)
    assert rollout.answers() == generate_batch(model, prompts, 5, temperature=1.0, top_k=20, eos_id=EOS)


def test_answer_logprobs_score_each_row_as_if_alone(model):
    torch.manual_seed(3)
    rollout = sample_rollouts(model, prompts_of_lengths(5, 2, 3, seed=4), RolloutSettings(max_new_tokens=6))
    got = answer_logprobs(model.eval(), rollout)  # eval: no dropout in either pass
    assert got.shape == (3, rollout.ids.shape[1] - 1)
    assert got[~rollout.answer_mask[:, 1:].bool()].eq(0).all()  # prompt and padding score exactly 0
    for i in range(3):
        real = rollout.ids[i][rollout.attention_mask[i].bool()]  # the row without padding
        with torch.no_grad():
            alone = torch.log_softmax(model(real[None, :-1]), dim=-1)[0].gather(-1, real[1:, None]).squeeze(-1)
        n = len(rollout.answers()[i])
        assert torch.allclose(got[i][rollout.answer_mask[i, 1:].bool()], alone[-n:], atol=1e-5)


def test_the_head_scores_the_answer_tokens_only(model):
    torch.manual_seed(6)
    rollout = sample_rollouts(model, prompts_of_lengths(5, 2, 4, seed=6), RolloutSettings(max_new_tokens=3))
    model.eval()
    rows = []
    hook = model.out_head.register_forward_hook(lambda module, inputs, out: rows.append(out.shape[:-1]))
    got = answer_logprobs(model, rollout)
    hook.remove()
    # One row of logits per answer token: the prompt and padding columns never reach the head.
    assert rows == [(int(rollout.answer_mask.sum()),)]
    with torch.no_grad():  # the same numbers from every column's logits
        logits = model(rollout.ids, attention_mask=rollout.attention_mask)[:, :-1]
    every_column = torch.log_softmax(logits, dim=-1).gather(-1, rollout.ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got, every_column * rollout.answer_mask[:, 1:], rtol=1e-5, atol=1e-6)


def test_row_sums_are_dpo_sequence_logprobs(model):
    torch.manual_seed(5)
    rollout = sample_rollouts(model, [[1, 2, 3, 4]] * 2, RolloutSettings(max_new_tokens=4))  # no padding on the left
    model.eval()
    square = rollout.answer_mask.bool() & rollout.attention_mask.bool()
    expected = sequence_logprobs(model, rollout.ids, square)
    assert torch.allclose(answer_logprobs(model, rollout).sum(dim=1), expected, atol=1e-5)


def test_gradients_flow_to_the_policy(model):
    rollout = sample_rollouts(model, [[1, 2], [3, 4, 5]], RolloutSettings(max_new_tokens=3))
    answer_logprobs(model, rollout).sum().backward()
    assert model.tok_emb.weight.grad is not None and model.tok_emb.weight.grad.abs().sum() > 0


def test_prompt_without_room_for_the_answer_is_named(model):
    with pytest.raises(ValueError, match=r"prompt 1 has 10 tokens; with max_new_tokens=4 it needs 14 .* context is 12"):
        sample_rollouts(model, [[1], list(range(10))], RolloutSettings(max_new_tokens=4))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        sample_rollouts(model, [[]], RolloutSettings(max_new_tokens=1))
    with pytest.raises(ValueError, match="no prompts"):
        sample_rollouts(model, [], RolloutSettings())
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        RolloutSettings(max_new_tokens=0)


def test_answer_logprobs_equal_transformers_with_the_same_weights(tmp_path):
    # TRL's PPO trainer (trl/trainer/ppo_trainer.py, v0.11-v0.19) takes the same quantity:
    # log_softmax(logits[:, context_length - 1 : -1]).gather(response), context_length = P.
    pytest.importorskip("transformers", reason="the reference implementation")
    from test_hf_gpt2 import random_hf_model

    hf = random_hf_model(vocab_size=211, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    hf.save_pretrained(tmp_path)
    ours = GPTModel.from_pretrained(tmp_path).eval()  # no dropout in either model
    hf.eval()
    torch.manual_seed(11)
    rollout = sample_rollouts(ours, prompts_of_lengths(6, 2, 9, seed=5), RolloutSettings(max_new_tokens=7))
    positions = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = hf(rollout.ids, attention_mask=rollout.attention_mask, position_ids=positions).logits
    P = rollout.prompt_width
    expected = torch.log_softmax(logits[:, P - 1:-1], dim=-1).gather(-1, rollout.ids[:, P:, None]).squeeze(-1)
    got = answer_logprobs(ours, rollout)[:, P - 1:]
    scored = rollout.answer_mask[:, P:].bool()
    assert (got - expected)[scored].abs().max() < 1e-4


def test_a_rollout_moves_between_devices_whole(model):
    rollout = sample_rollouts(model, [[1, 2]], RolloutSettings(max_new_tokens=2))
    moved = rollout.to("cpu")
    assert isinstance(moved, Rollout) and moved.prompt_width == rollout.prompt_width
