"""NEFTune: noise of the right size on each example's own tokens in training, none on its
padding, nothing at all in eval mode or without alpha; the lengths of real instruction
batches; a short instruction-tuning run through the training loop."""

import copy
import math

import pytest
import torch
from torch import nn

from minigpt.finetuning.instruction import (
    InstructionDataset,
    collate_instructions,
    example_lengths,
    instruction_dataloader,
    instruction_loss,
)
from minigpt.finetuning.neftune import disable_neftune, enable_neftune, neftune_enabled, neftune_lengths, neftune_noise
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.training.config import TrainConfig
from minigpt.training.loop import train_model
from minigpt.training.losses import next_token_loss

TINY = GPTConfig(vocab_size=128, context_length=32, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.1)
ENTRIES = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
           {"instruction": "Add.", "input": "2 and 3", "output": "5, not <|endoftext|> 6."},
           {"instruction": "Say hi.", "input": "", "output": "Hi!"}]


class Embedder(nn.Module):
    """Only a token embedding: wide enough (4,096) for tight statistics of the noise."""

    def __init__(self, emb_dim: int = 4096) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(64, emb_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(ids)


def test_eval_mode_outputs_are_unchanged_bit_for_bit():
    model = GPTModel(TINY).eval()
    ids = torch.randint(0, 128, (2, 10))
    plain = model(ids)
    enable_neftune(model, 15.0)
    state = torch.get_rng_state()
    assert torch.equal(model(ids), plain)
    with neftune_lengths(model, torch.tensor([4, 10])):
        assert torch.equal(model(ids), plain)
    assert torch.equal(torch.get_rng_state(), state)  # eval mode draws no noise at all


def test_without_alpha_training_outputs_equal_the_plain_model():
    model = GPTModel(TINY).train()
    ids, lengths = torch.randint(0, 128, (2, 10)), torch.tensor([4, 10])
    torch.manual_seed(1)
    plain = model(ids)  # dropout on: the same seed gives the same masks
    for alpha in (None, 5.0):
        enable_neftune(model, alpha)
        torch.manual_seed(1)
        with neftune_lengths(model, lengths):
            noisy = model(ids)
        assert torch.equal(noisy, plain) == (alpha is None)
    assert neftune_enabled(model)
    disable_neftune(model)
    assert not neftune_enabled(model)
    torch.manual_seed(1)
    assert torch.equal(model(ids), plain)


def test_noise_has_each_examples_own_size_and_spares_the_padding():
    alpha, dim, lengths = 5.0, 4096, torch.tensor([5, 12])
    model = enable_neftune(Embedder(dim).train(), alpha)
    ids = torch.randint(0, 64, (2, 14))  # padded to 14 tokens
    with neftune_lengths(model, lengths):
        noise = model(ids) - model.tok_emb.weight[ids]
    for row, length in enumerate(lengths.tolist()):
        m = alpha / math.sqrt(length * dim)  # the example's own length, not the padded 14
        real = noise[row, :length]
        # 20,480 and 49,152 draws: the largest lies within m/1,000 of m, the standard deviation within 2 %.
        assert m * 0.999 < real.abs().max() <= m * (1 + 1e-5)
        assert real.std().item() == pytest.approx(m / math.sqrt(3), rel=0.02)
        assert abs(real.mean().item()) < 0.02 * m
        assert torch.equal(noise[row, length:], torch.zeros_like(noise[row, length:]))
    assert noise[0, :5].abs().max() > 1.5 * noise[1, :12].abs().max()  # the shorter example gets more


def test_noise_is_drawn_in_the_embeddings_dtype_from_the_global_generator():
    model = enable_neftune(Embedder(256).to(torch.bfloat16).train(), 5.0)
    ids, lengths = torch.randint(0, 64, (2, 6)), torch.tensor([3, 6])
    torch.manual_seed(7)
    with neftune_lengths(model, lengths):
        first = model(ids)
    assert first.dtype == torch.bfloat16
    torch.manual_seed(7)
    with neftune_lengths(model, lengths):
        assert torch.equal(model(ids), first)
    assert neftune_noise(torch.zeros(2, 6, 8, dtype=torch.bfloat16), lengths, 1.0).dtype == torch.bfloat16


def test_training_without_lengths_or_with_a_bad_alpha_says_what_to_do():
    model = enable_neftune(GPTModel(TINY).train(), 5.0)
    with pytest.raises(RuntimeError, match="neftune_lengths"):
        model(torch.zeros(1, 4, dtype=torch.long))
    with neftune_lengths(model, torch.tensor([4, 4])), pytest.raises(ValueError, match=r"shape \(1,\), got \(2,\)"):
        model(torch.zeros(1, 4, dtype=torch.long))
    for alpha in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive number"):
            enable_neftune(model, alpha)
    with pytest.raises(TypeError, match="tok_emb"):
        enable_neftune(nn.Linear(2, 2), 5.0)


def test_a_deep_copy_can_be_switched_off_alone():
    model = enable_neftune(GPTModel(TINY), 5.0)
    reference = disable_neftune(copy.deepcopy(model))
    assert neftune_enabled(model) and not neftune_enabled(reference)
    assert len(model.tok_emb._forward_hooks) == 1
    enable_neftune(model, 10.0)  # a new alpha, not a second hook
    assert len(model.tok_emb._forward_hooks) == 1 and model.tok_emb._neftune.alpha == 10.0


@pytest.mark.parametrize("mask_instruction", [False, True])
def test_example_lengths_of_a_real_batch_are_the_texts_lengths(char_tokenizer, mask_instruction):
    examples = InstructionDataset(ENTRIES, char_tokenizer)
    assert char_tokenizer.eot_token in examples[1].ids  # an end-of-text inside a text is a real token
    true = [len(example.ids) for example in examples]
    assert len(set(true)) == 3
    inputs, targets = collate_instructions(list(examples), mask_instruction=mask_instruction)
    assert example_lengths(targets).tolist() == true
    cut = true[0] - 2  # allowed_max_length shorter than two of the examples
    _, targets = collate_instructions(list(examples), allowed_max_length=cut, mask_instruction=mask_instruction)
    assert example_lengths(targets).tolist() == [min(n, cut) for n in true]
    # A prompt cut so short that no target is left: every input position is still a real token.
    _, targets = collate_instructions(list(examples), allowed_max_length=20, mask_instruction=mask_instruction)
    assert example_lengths(targets).tolist() == [20, 20, 20]


def _instruction_run(alpha, loss_fn):
    torch.manual_seed(3)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=128, emb_dim=16, n_heads=2, n_layers=1,
                               drop_rate=0.0))
    enable_neftune(model, alpha)
    loader = instruction_dataloader(ENTRIES, batch_size=3, allowed_max_length=128, mask_instruction=True)
    config = TrainConfig(max_steps=4, lr=1e-2, min_lr=1e-2, warmup_steps=0, eval_every=2, precision="float32")
    history = train_model(model, loader, loader, config, device="cpu", progress=False, loss_fn=loss_fn)
    return history, model.state_dict()


def test_instruction_tuning_with_neftune_through_the_training_loop(one_thread):
    plain, plain_weights = _instruction_run(None, next_token_loss)
    off, off_weights = _instruction_run(None, instruction_loss)
    assert off.step_losses == plain.step_losses and off.val_losses == plain.val_losses
    assert all(torch.equal(off_weights[name], plain_weights[name]) for name in plain_weights)
    noisy, noisy_weights = _instruction_run(5.0, instruction_loss)
    assert all(math.isfinite(loss) for loss in noisy.step_losses + noisy.val_losses)
    assert noisy.step_losses[0] != plain.step_losses[0]  # the noise reached the first step's forward
    assert noisy.val_losses[-1] < noisy.val_losses[0]  # and it still learns
    again, _ = _instruction_run(5.0, instruction_loss)
    assert again.step_losses == noisy.step_losses  # one seed, one run: the noise is reproducible
