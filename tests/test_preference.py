"""Preference tuning: the pairs' data, answer log-probabilities (by hand and against
transformers), the DPO loss and its figures (hand-computed), the three references giving
one loss, the reference cache, dropout off, and the loop recording the rewards."""

import functools
import json
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from minigpt.data.windows import tokenize
from minigpt.finetuning.dpo import DPOLoss, dpo_loss
from minigpt.finetuning.instruction import (
    InstructionDataset,
    collate_instructions,
    load_instruction_data,
    split_instruction_data,
)
from minigpt.finetuning.neftune import enable_neftune
from minigpt.finetuning.preference import (
    PreferenceDataset,
    PreferenceExample,
    collate_preferences,
    load_preference_data,
    preference_dataloader,
    validate_preference_entries,
)
from minigpt.finetuning.prompt_format import RESPONSE_HEADER, format_input, format_response
from minigpt.finetuning.reference import (
    AdaptersOffReference,
    FrozenReference,
    disable_dropout,
    pair_logprobs,
    precompute_reference,
    sequence_logprobs,
)
from minigpt.lora.adapters import apply_lora
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer
from minigpt.training.config import TrainConfig
from minigpt.training.loop import train_model
from minigpt.training.losses import input_tokens, scored_targets

# Files this module reads from the data folder (without it, from the copies minigpt ships).
DATA_FILES = ["instruct/instruction-data-with-preference.json", "instruct/instruction-data.json"]

SMALL = GPTConfig(vocab_size=50257, context_length=96, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)
ENTRIES = [
    {"instruction": "Name a colour.", "input": "", "chosen": "Blue, thank you.", "rejected": "Blue, duh."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "chosen": "It is 5.", "rejected": "5, obviously."},
    {"instruction": "Say hi.", "chosen": "Hello there!", "rejected": "What do you want?"},
    {"instruction": "Spell cat.", "input": "", "output": "C-A-T.", "chosen": "C-A-T, gladly.", "rejected": "C-A-T."},
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs tiny models."""


def tiny_model(seed: int = 0, cfg: GPTConfig = SMALL) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg)


def batch_of(entries=ENTRIES, tokenizer=None, **collate) -> dict:
    return collate_preferences([PreferenceDataset(entries, tokenizer)[i] for i in range(len(entries))], **collate)


# ------------------------------------------------------------------------------ data


def test_bad_entries_are_named_by_index_and_key():
    data = [ENTRIES[0], {"instruction": "x", "rejected": "r"}, {"instruction": "y", "chosen": "c", "rejected": " "},
            {"instruction": "z", "chosen": 3, "rejected": "r"}, "not an object"]
    with pytest.raises(ValueError) as err:
        validate_preference_entries(data, source="prefs.json")
    message = str(err.value)
    assert message.startswith("prefs.json has bad entries")
    for part in ("entry 1 has no 'chosen' field", "entry 2: 'rejected' is empty",
                 "entry 3: 'chosen' must be a string, got int", "entry 4 is a str, not an object"):
        assert part in message
    assert "entry 0" not in message
    with pytest.raises(ValueError, match="non-empty JSON list"):
        validate_preference_entries([])


def test_pairs_with_the_same_two_answers_are_dropped_with_one_warning(caplog):
    same = [{"instruction": f"i{k}", "chosen": "a", "rejected": "a"} for k in range(3)]
    with caplog.at_level(logging.WARNING, logger="minigpt.finetuning.preference"):
        kept = validate_preference_entries([ENTRIES[0], *same, ENTRIES[1]])
    assert kept == [ENTRIES[0], ENTRIES[1]]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 3 of 5 pairs" in warnings[0].getMessage()
    with pytest.raises(ValueError, match="nothing to learn from"):
        validate_preference_entries(same)


def test_a_file_that_is_not_json_is_an_error_naming_the_place(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text('[{"instruction": "a",', encoding="utf-8")
    with pytest.raises(ValueError, match=r"prefs.json is not valid JSON: .* line 1"):
        load_preference_data(path)
    path.write_text(json.dumps(ENTRIES), encoding="utf-8")
    assert load_preference_data(path) == ENTRIES


def test_the_real_data_loads_and_tokenizes_as_instruction_tuning_does(data_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="minigpt.finetuning.preference"):
        data = load_preference_data()
    assert len(data) == 1094  # 1,100 entries, 6 with two identical answers
    assert "dropped 6 of 1100 pairs" in caplog.text
    assert all(entry["chosen"] != entry["rejected"] for entry in data)
    dataset = PreferenceDataset(data[:60])
    for entry, example in zip(data[:60], dataset.examples, strict=True):
        for side in ("chosen", "rejected"):
            as_instruction_tuning = (tokenize(format_input(entry)) + tokenize(format_response({"output": entry[side]}))
                                     + [50256])
            assert example.prompt + getattr(example, side) == as_instruction_tuning


def test_the_dataset_holds_prompt_and_answers_with_one_end_of_text(char_tokenizer):
    dataset = PreferenceDataset(ENTRIES, char_tokenizer)
    assert len(dataset) == 4 and dataset.entries == ENTRIES
    example = dataset[1]
    assert char_tokenizer.decode(example.prompt) == format_input(ENTRIES[1]) + RESPONSE_HEADER
    assert example.chosen == [ord(c) for c in "It is 5."] + [50256]
    assert example.rejected == [ord(c) for c in "5, obviously."] + [50256]
    assert example.reference is None


def test_collate_pads_both_sides_to_one_width_and_masks_only_the_answers():
    examples = [dataset_item([1, 2, 3], [4, 5], [6]), dataset_item([7], [8, 9, 10, 11], [12, 13])]
    batch = collate_preferences(examples, pad_token_id=0)
    assert batch["chosen_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11]]
    assert batch["rejected_ids"].tolist() == [[1, 2, 3, 6, 0], [7, 12, 13, 0, 0]]
    assert batch["chosen_mask"].tolist() == [[False, False, False, True, True], [False, True, True, True, True]]
    assert batch["rejected_mask"].tolist() == [[False, False, False, True, False], [False, True, True, False, False]]
    assert batch["chosen_mask"].dtype == torch.bool and batch["chosen_ids"].dtype == torch.long
    assert (batch["num_scored"], batch["num_tokens"]) == (2, 20)
    assert scored_targets(batch) == 2 and input_tokens(batch) == 20  # pairs; tokens of both sides
    assert "ref_chosen_logps" not in batch
    cut = collate_preferences(examples, pad_token_id=0, allowed_max_length=3)
    assert cut["chosen_ids"].tolist() == [[1, 2, 3], [7, 8, 9]]
    assert cut["chosen_mask"].tolist() == [[False, False, False], [False, True, True]]  # first pair: nothing left
    assert cut["num_tokens"] == 12


def dataset_item(prompt, chosen, rejected):
    return PreferenceExample(prompt, chosen, rejected)


def test_the_default_pad_id_is_end_of_text_and_the_loader_batches_pairs(char_tokenizer):
    loader = preference_dataloader(ENTRIES, char_tokenizer, batch_size=3, allowed_max_length=None)
    first, second = list(loader)
    assert first["chosen_ids"].shape[0] == 3 and second["chosen_ids"].shape[0] == 1
    longest = max(len(format_input(e) + RESPONSE_HEADER) + max(len(e["chosen"]), len(e["rejected"])) + 1
                  for e in ENTRIES[:3])
    assert first["chosen_ids"].shape[1] == first["rejected_ids"].shape[1] == longest
    third = PreferenceDataset(ENTRIES, char_tokenizer)[2]
    end = len(third.prompt) + len(third.rejected)
    assert end < longest and first["rejected_ids"][2, end - 1:].tolist() == [50256] * (longest - end + 1)
    assert first["rejected_mask"][2].nonzero().flatten().tolist() == list(range(len(third.prompt), end))


# ------------------------------------------------------------------- log-probabilities


class FixedLogits(nn.Module):
    """A 'model' whose logits are given: row t of sequence b is ``logits[b, t]``."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits[:, : ids.shape[1]]


def test_sequence_logprobs_by_hand():
    # Every row's logits are log(1, 2, 1): probabilities 1/4, 1/2, 1/4 for tokens 0, 1, 2 -
    # except row (0, 1), log(1, 1, 2): 1/4, 1/4, 1/2.
    logits = torch.log(torch.tensor([1.0, 2.0, 1.0])).repeat(2, 3, 1)
    logits[0, 1] = torch.log(torch.tensor([1.0, 1.0, 2.0]))
    ids = torch.tensor([[0, 1, 2], [2, 2, 1]])
    mask = torch.tensor([[False, True, True], [False, False, True]])
    model = FixedLogits(logits)
    # Sequence 0: p(1 | row 0) = 1/2, p(2 | row 1) = 1/2. Sequence 1: only token 2, p(1 | row 1) = 1/2.
    expected_sums = torch.tensor([math.log(0.5 * 0.5), math.log(0.5)])
    assert torch.allclose(sequence_logprobs(model, ids, mask), expected_sums)
    assert torch.allclose(sequence_logprobs(model, ids, mask, average=True), expected_sums / torch.tensor([2.0, 1.0]))
    scoring_first = mask.clone()
    scoring_first[:, 0] = True  # the first token has no prediction: ignored
    assert torch.allclose(sequence_logprobs(model, ids, scoring_first), expected_sums)
    other = torch.tensor([[False, True, False], [False, False, False]])
    assert torch.allclose(sequence_logprobs(model, ids, other), torch.tensor([math.log(0.5), 0.0]))
    assert sequence_logprobs(model, ids, other, average=True)[1] == 0.0  # nothing scored: 0, not NaN
    with pytest.raises(ValueError, match="same"):
        sequence_logprobs(model, ids, mask[:, :2])


def test_sequence_logprobs_match_transformers_on_the_same_weights(tmp_path):
    from test_hf_gpt2 import SHAPES, random_hf_model

    hf = random_hf_model(**SHAPES["tiny"])
    hf.save_pretrained(tmp_path)
    ours = GPTModel.from_pretrained(tmp_path).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, SHAPES["tiny"]["vocab_size"], (3, 20), generator=g)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 5:], mask[1, 12:18], mask[2, 1:] = True, True, True
    with torch.no_grad():
        got = sequence_logprobs(ours, ids, mask)
        for row in range(3):
            # transformers' loss is the mean cross-entropy over labels that are not -100 (shifted inside).
            labels = ids[row : row + 1].masked_fill(~mask[row : row + 1], -100)
            expected = -hf(ids[row : row + 1], labels=labels).loss * mask[row, 1:].sum()
            assert got[row].item() == pytest.approx(expected.item(), abs=1e-4)
    assert got.shape == (3,) and got.dtype == torch.float32


def test_pair_logprobs_score_both_sides_in_one_pass_as_separate_passes_would():
    model = tiny_model().eval()
    batch = batch_of()
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    with torch.no_grad():
        chosen, rejected = pair_logprobs(model, batch)
        assert calls == [(8, batch["chosen_ids"].shape[1])]
        assert torch.allclose(chosen, sequence_logprobs(model, batch["chosen_ids"], batch["chosen_mask"]), atol=1e-5)
        assert torch.allclose(rejected, sequence_logprobs(model, batch["rejected_ids"], batch["rejected_mask"]),
                              atol=1e-5)
        narrower = {**batch, "rejected_ids": batch["rejected_ids"][:, :-3],
                    "rejected_mask": batch["rejected_mask"][:, :-3]}
        assert torch.allclose(pair_logprobs(model, narrower)[0], chosen, atol=1e-5)


# ------------------------------------------------------------------------------ the loss


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(eps):
    logps = torch.tensor([-12.5, -3.0, -40.0], dtype=torch.float64), torch.tensor([-9.0, -7.5, -1.0],
                                                                                dtype=torch.float64)
    loss, metrics = dpo_loss(*logps, *logps, beta=0.3, label_smoothing=eps)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert all(metrics[name].item() == 0.0 for name in metrics)
    assert sorted(metrics) == ["rewards/accuracies", "rewards/chosen", "rewards/margins", "rewards/rejected"]


def test_each_loss_type_and_the_rewards_by_hand():
    # Pair 0: h = (-10 - -12) - (-11 - -11) = 2; pair 1: h = (-5 - -4) - (-6 - -6) = -1. beta = 0.5.
    pc, pr = torch.tensor([-10.0, -5.0], dtype=torch.float64), torch.tensor([-12.0, -4.0], dtype=torch.float64)
    rc, rr = torch.tensor([-11.0, -6.0], dtype=torch.float64), torch.tensor([-11.0, -6.0], dtype=torch.float64)

    def softplus(x):  # -log sigmoid(-x)
        return math.log1p(math.exp(x))

    cases = {
        ("sigmoid", 0.0): (softplus(-1.0) + softplus(0.5)) / 2,
        ("sigmoid", 0.2): (0.8 * softplus(-1.0) + 0.2 * softplus(1.0) + 0.8 * softplus(0.5) + 0.2 * softplus(-0.5)) / 2,
        ("ipo", 0.0): ((2 - 1) ** 2 + (-1 - 1) ** 2) / 2,  # (h - 1 / (2 * 0.5)) ** 2
        ("hinge", 0.0): (max(0.0, 1 - 1.0) + max(0.0, 1 + 0.5)) / 2,
    }
    for (loss_type, eps), expected in cases.items():
        loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=eps, loss_type=loss_type)
        assert loss.item() == pytest.approx(expected, rel=1e-12), loss_type
    # Rewards: chosen 0.5 * (1, 1), rejected 0.5 * (-1, 2); margins (1, -0.5); only pair 0 ranked right.
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.25)
    assert metrics["rewards/margins"].item() == pytest.approx(0.25)
    assert metrics["rewards/accuracies"].item() == 0.5
    assert not any(value.requires_grad for value in metrics.values())


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_the_gradient_raises_the_chosen_answer_relative_to_the_rejected(loss_type):
    pc = torch.tensor([-10.0, -8.0], requires_grad=True)
    pr = torch.tensor([-10.0, -9.0], requires_grad=True)
    ref = torch.tensor([-10.0, -9.0]), torch.tensor([-10.0, -9.0])
    loss, _ = dpo_loss(pc, pr, *ref, beta=0.1, loss_type=loss_type)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descending raises chosen, lowers rejected
    assert torch.allclose(pc.grad, -pr.grad)  # only the difference matters


def test_a_dpo_step_on_a_model_raises_chosen_over_rejected():
    model = tiny_model()
    batch = batch_of()
    loss_fn = DPOLoss(FrozenReference(model), beta=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def gap():
        with torch.no_grad():
            chosen, rejected = pair_logprobs(model, batch)
        return (chosen - rejected).mean().item()

    before = gap()
    loss, metrics = loss_fn(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and metrics["rewards/margins"].item() == 0.0
    loss.backward()
    optimizer.step()
    assert gap() > before
    after, metrics = loss_fn(model, batch)
    assert after.item() < math.log(2) and metrics["rewards/margins"].item() > 0


def test_settings_errors_say_what_is_allowed():
    one = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown loss_type 'kto'; choose one of sigmoid, ipo, hinge"):
        dpo_loss(one, one, one, one, loss_type="kto")
    with pytest.raises(ValueError, match="beta must be a positive number"):
        DPOLoss(beta=0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        DPOLoss(label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing applies to the sigmoid loss only"):
        DPOLoss(label_smoothing=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="no precomputed reference log-probabilities"):
        DPOLoss()(tiny_model(), batch_of())
    with pytest.raises(ValueError, match="no LoRA layers"):
        AdaptersOffReference(tiny_model())


# ------------------------------------------------------------------------ the reference


def lora_policy_and_base():
    """A LoRA policy whose adapters already moved (so policy != reference) and a copy of its base."""
    base = tiny_model()
    policy = tiny_model()
    apply_lora(policy, rank=2, alpha=4)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if name.endswith("lora.B"):
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return policy, base


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_the_three_references_give_the_same_loss(tmp_path, loss_type):
    policy, base = lora_policy_and_base()
    dataset = PreferenceDataset(ENTRIES)
    batch = collate_preferences([dataset[i] for i in range(4)], allowed_max_length=64)
    copy_loss, copy_metrics = DPOLoss(FrozenReference(base), loss_type=loss_type)(policy, batch)
    off_loss, off_metrics = DPOLoss(AdaptersOffReference(policy), loss_type=loss_type)(policy, batch)
    precompute_reference(base, dataset, allowed_max_length=64, batch_size=4, cache_dir=tmp_path)
    stored = collate_preferences([dataset[i] for i in range(4)], allowed_max_length=64)
    assert stored["ref_chosen_logps"].shape == (4,)
    cached_loss, cached_metrics = DPOLoss(None, loss_type=loss_type)(policy, stored)
    assert abs(copy_loss.item() - (math.log(2) if loss_type == "sigmoid" else 25.0)) > 1e-3  # policy != reference
    for loss, metrics in ((off_loss, off_metrics), (cached_loss, cached_metrics)):
        assert loss.item() == pytest.approx(copy_loss.item(), abs=1e-5)
        for name, value in metrics.items():
            assert value.item() == pytest.approx(copy_metrics[name].item(), abs=1e-5), name
    # The adapters are back on after the reference's pass, and the policy is still training.
    assert policy.training and all(m.enabled for m in policy.modules() if hasattr(m, "enabled"))


def test_a_frozen_reference_is_a_copy_that_training_the_policy_leaves_alone():
    policy = tiny_model()
    reference = FrozenReference(policy)
    assert reference.model is not policy and not reference.model.training
    assert not any(p.requires_grad for p in reference.model.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    before = reference.fingerprint()
    with torch.no_grad():
        policy.tok_emb.weight.add_(1.0)
    assert reference.fingerprint() == before != FrozenReference(policy, copy=False).fingerprint()


def test_the_reference_runs_in_eval_mode_without_gradients_and_never_in_training_mode():
    policy = tiny_model(cfg=GPTConfig.from_dict({**SMALL.to_dict(), "drop_rate": 0.5}))
    apply_lora(policy, rank=2, alpha=4, dropout=0.5)
    modes = []
    policy.register_forward_hook(lambda module, args, out: modes.append((module.training, torch.is_grad_enabled())))
    policy.train()
    batch = batch_of()
    AdaptersOffReference(policy).logps(batch)
    FrozenReference(policy, copy=False).logps(batch)
    assert modes == [(False, False), (False, False)]  # eval mode: dropout and training-only noise are off
    assert policy.training


def test_dpo_switches_the_policys_dropout_off_but_leaves_it_in_training_mode():
    cfg = GPTConfig.from_dict({**SMALL.to_dict(), "drop_rate": 0.5})
    policy = tiny_model(cfg=cfg)
    apply_lora(policy, rank=2, alpha=4, dropout=0.3)
    policy.train()
    loss_fn = DPOLoss(FrozenReference(policy))
    first, _ = loss_fn(policy, batch_of())
    second, _ = loss_fn(policy, batch_of())
    assert first.item() == second.item() == pytest.approx(math.log(2), abs=1e-6)  # no dropout noise on either side
    assert policy.training and policy.cfg.drop_rate == 0.5
    assert all(m.p == 0.0 for m in policy.modules() if isinstance(m, nn.Dropout))
    assert disable_dropout(tiny_model(cfg=cfg)).trf_blocks[0].att.dropout_p == 0.0


def test_neftune_noise_reaches_the_policy_with_each_sequences_length_and_never_the_reference():
    policy = tiny_model()
    apply_lora(policy, rank=2, alpha=4)
    batch = batch_of()
    reference = AdaptersOffReference(policy)
    with torch.no_grad():
        clean = pair_logprobs(policy.eval(), batch)
        clean_reference = reference.logps(batch)
    enable_neftune(policy, 5.0)
    seen = []
    policy.tok_emb.register_forward_hook(lambda m, args, out: seen.append((m.training, m._neftune.lengths)))
    policy.train()
    with torch.no_grad():
        for got, expected in zip(reference.logps(batch), clean_reference, strict=True):
            assert torch.equal(got, expected)  # eval mode: bit for bit without noise
        noisy = pair_logprobs(policy, batch)
        assert not torch.allclose(noisy[0], clean[0])  # the policy, training, gets noise
    loss, _ = DPOLoss(reference)(policy, batch)  # no "lengths are unknown" error
    assert torch.isfinite(loss)
    lengths = [len(e.prompt) + len(getattr(e, side)) for side in ("chosen", "rejected")
               for e in PreferenceDataset(ENTRIES).examples]
    assert seen[0][0] is False and seen[1][0] is True
    assert seen[1][1].tolist() == lengths  # prompt + answer + end-of-text: padding left out
    assert FrozenReference(policy).logps(batch)[0].tolist() == pytest.approx(clean[0].tolist(), abs=1e-5)


def test_the_reference_cache_is_reused_only_for_the_same_model_and_data(tmp_path, monkeypatch, caplog):
    base, dataset = tiny_model(), PreferenceDataset(ENTRIES)
    path = precompute_reference(base, dataset, allowed_max_length=64, cache_dir=tmp_path)
    assert path.parent == tmp_path and path.name.startswith("reference-logps-") and path.suffix == ".safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written atomically: no temporary file left
    values = dataset.reference_logps.clone()
    # The same model and data: read back, nothing computed.
    monkeypatch.setattr(FrozenReference, "logps", lambda *a, **k: pytest.fail("recomputed instead of read"))
    again = PreferenceDataset(ENTRIES)
    assert precompute_reference(base, again, allowed_max_length=64, cache_dir=tmp_path) == path
    assert torch.equal(again.reference_logps, values)
    monkeypatch.undo()
    # Another model, other data or another cut: another file.
    other_model = tiny_model(seed=1)
    assert precompute_reference(other_model, PreferenceDataset(ENTRIES), allowed_max_length=64,
                                cache_dir=tmp_path) != path
    assert precompute_reference(base, PreferenceDataset(ENTRIES[:3]), allowed_max_length=64,
                                cache_dir=tmp_path) != path
    assert precompute_reference(base, PreferenceDataset(ENTRIES), allowed_max_length=32, cache_dir=tmp_path) != path
    assert len(list(tmp_path.iterdir())) == 4
    # A damaged file is computed again, with a warning.
    path.write_bytes(path.read_bytes()[:20])
    fresh = PreferenceDataset(ENTRIES)
    with caplog.at_level(logging.WARNING, logger="minigpt.finetuning.dpo"):
        precompute_reference(base, fresh, allowed_max_length=64, cache_dir=tmp_path)
    assert "unreadable reference cache" in caplog.text and torch.equal(fresh.reference_logps, values)


def test_precomputed_values_fit_only_batches_cut_the_same_way():
    dataset = PreferenceDataset(ENTRIES)
    assert precompute_reference(tiny_model(), dataset, allowed_max_length=64) is None
    with pytest.raises(ValueError, match="precomputed with allowed_max_length=64, but this batch is cut to 32"):
        collate_preferences([dataset[0], dataset[1]], allowed_max_length=32)
    with pytest.raises(ValueError, match=r"must have shape \(4, 2\)"):
        dataset.set_reference(torch.zeros(3, 2), 64)
    dataset.clear_reference()
    assert "ref_chosen_logps" not in collate_preferences([dataset[0]], allowed_max_length=32)


# ----------------------------------------------------------------------- in the loop


def test_the_training_loop_records_loss_and_rewards_for_both_splits(caplog):
    policy = tiny_model()
    train = preference_dataloader(ENTRIES, batch_size=2, shuffle=False, allowed_max_length=64)
    val = preference_dataloader(ENTRIES[:3], batch_size=2, allowed_max_length=64)
    config = TrainConfig(max_steps=4, lr=1e-2, min_lr=1e-2, warmup_steps=0, eval_every=2, eval_iter=None)
    with caplog.at_level(logging.INFO, logger="minigpt.training.loop"):
        history = train_model(policy, train, val, config, device="cpu", loss_fn=DPOLoss(FrozenReference(policy)),
                              progress=False)
    assert history.steps == [0, 2, 4]
    names = ("chosen", "rejected", "margins", "accuracies")
    assert sorted(history.metrics) == sorted(f"{s}/rewards/{n}" for s in ("train", "val") for n in names)
    assert all(len(values) == 3 for values in history.metrics.values())
    assert history.val_losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert history.metrics["val/rewards/accuracies"][0] == 0.0 and history.metrics["train/rewards/margins"][0] == 0
    assert history.metrics["train/rewards/margins"][-1] > 0 and history.train_losses[-1] < math.log(2)
    first, second = list(train)[:2]  # steps 1 and 2 (not shuffled), each feeding both sides of 2 pairs
    assert history.tokens_seen[1] == input_tokens(first) + input_tokens(second) == 2 * (
        first["chosen_ids"].numel() + second["chosen_ids"].numel())
    assert "val   rewards/accuracies" in caplog.text and "rewards/margins" in caplog.text


class CompactTokenizer:
    """GPT-2's BPE with its ids renumbered densely over the tokens that ``texts`` use (4,401 for
    the instruction and preference data): the same tokens, but a tiny model's output layer
    scores 4,401 ids instead of 50,257, which makes CPU training about ten times faster."""

    def __init__(self, texts):
        self.base = get_gpt2_tokenizer()
        self.big = sorted({i for text in texts for i in self.base.encode(text)} | {self.base.eot_token})
        self.small = {big: small for small, big in enumerate(self.big)}
        self.eot_token, self.n_vocab = self.small[self.base.eot_token], len(self.big)

    def encode(self, text, allowed_special=frozenset()):
        return [self.small[i] for i in self.base.encode(text, allowed_special=allowed_special)]

    def decode(self, ids):
        return self.base.decode([self.big[i] for i in ids])


def instruction_tuned_then_dpo(lr: float, dpo_steps: int, seed: int = 0):
    """A tiny GPT (2 layers, 64 wide) instruction-tuned for 300 steps on the instruction data,
    then DPO-tuned on the preference data's training pairs, evaluated every 200 steps on
    the 165 held-out pairs (validation and test parts). Returns the DPO run's History."""
    instructions, pairs = load_instruction_data(), load_preference_data()
    texts = [format_input(e) for e in instructions + pairs] + [RESPONSE_HEADER] + [e["output"] for e in instructions]
    tokenizer = CompactTokenizer(texts + [e[k] for e in pairs for k in ("chosen", "rejected")])
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.n_vocab, context_length=128, emb_dim=64, n_heads=2, n_layers=2,
                               drop_rate=0.0))
    train, val, _ = split_instruction_data(instructions)
    collate = functools.partial(collate_instructions, pad_token_id=tokenizer.eot_token, allowed_max_length=128,
                                mask_instruction=True)
    loaders = [DataLoader(InstructionDataset(part, tokenizer), batch_size=8, shuffle=shuffle, drop_last=shuffle,
                          collate_fn=collate) for part, shuffle in ((train, True), (val, False))]
    train_model(model, *loaders, TrainConfig(max_steps=300, lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_every=300,
                                             eval_iter=7), device="cpu", progress=False)
    train, val, test = split_instruction_data(pairs)
    collate = functools.partial(collate_preferences, pad_token_id=tokenizer.eot_token, allowed_max_length=128)
    loaders = [DataLoader(PreferenceDataset(part, tokenizer, tokenizer.eot_token), batch_size=8, shuffle=shuffle,
                          drop_last=shuffle, collate_fn=collate)
               for part, shuffle in ((train, True), (val + test, False))]
    config = TrainConfig(max_steps=dpo_steps, lr=lr, min_lr=lr, warmup_steps=0, weight_decay=0.0, eval_every=200,
                         eval_iter=21)
    return train_model(model, *loaders, config, device="cpu", loss_fn=DPOLoss(FrozenReference(model), beta=0.1),
                       progress=False)


@pytest.mark.slow
def test_dpo_ranks_held_out_pairs_right_within_cpu_minutes(data_dir):
    """The issue's "done when" on a tiny instruction-tuned GPT (about two CPU minutes).

    The learning rate is 10x the default 5e-6 (tuned for GPT-2 medium, 1,024 wide): with Adam
    each weight moves about lr per step, and a 64-wide model needs larger moves for the same
    change of its log-probabilities. At 5e-6 the same run reaches only 0.70 in 400 steps and
    stays there (0.71 after 1,000).
    """
    history = instruction_tuned_then_dpo(lr=5e-5, dpo_steps=400)
    accuracy, margin = history.metrics["val/rewards/accuracies"], history.metrics["val/rewards/margins"]
    assert history.steps == [0, 200, 400]
    assert accuracy[0] == 0.0 and margin[0] == 0.0  # the policy starts as the reference
    assert accuracy[-1] >= 0.7 and margin[-1] > 0
    assert margin == sorted(margin) and history.val_losses[-1] < history.val_losses[0] < 0.7


def test_split_of_preference_data_follows_instruction_tuning():
    data = [{**ENTRIES[0], "instruction": str(i)} for i in range(100)]
    train, val, test = split_instruction_data(data)
    assert (len(train), len(val), len(test)) == (85, 5, 10)
