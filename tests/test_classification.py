"""Classification fine-tuning: datasets with the label at the last real token, head surgery
and freezing, padding-proof pooling, saving and checked loading, and a classifier that
really learns spam from the real data."""

import json
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from minigpt.finetuning.classification import (
    LABELS_FILE,
    ClassificationDataset,
    calc_accuracy_loader,
    classify,
    classify_texts,
    load_classifier,
    make_classifier,
    save_classifier,
    train_classifier,
)
from minigpt.finetuning.heads import last_token_logits
from minigpt.finetuning.labelled_data import balance_classes, load_labelled_texts, split_examples
from minigpt.lora.adapters import apply_lora, merge_lora
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.tokenizers.gpt2 import PAD_TOKEN_ID, get_gpt2_tokenizer

# Files this module reads from the data folder (without it, from the copies minigpt ships).
DATA_FILES = ["sms_spam/SMSSpamCollection.tsv"]

PAD = 50256
SMALL = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=2,
                  drop_rate=0.0, tie_weights=True)


def test_the_padding_id_is_gpt2s_end_of_text():
    assert PAD_TOKEN_ID == PAD


# --- data --------------------------------------------------------------------------------


def test_dataset_truncates_pads_and_puts_the_label_at_the_last_real_token(char_tokenizer):
    examples = [("abc", "spam"), ("hello", "ham"), ("x", "ham")]
    dataset = ClassificationDataset(examples, char_tokenizer, max_length=4)
    assert dataset.label_names == ["ham", "spam"]
    assert dataset.max_length == 4  # "hello" cut to "hell"
    inputs, targets = zip(*(dataset[i] for i in range(3)), strict=True)
    assert torch.stack(inputs).tolist() == [
        [97, 98, 99, PAD],
        [104, 101, 108, 108],
        [120, PAD, PAD, PAD],
    ]
    assert torch.stack(targets).tolist() == [
        [-100, -100, 1, -100],
        [-100, -100, -100, 0],
        [0, -100, -100, -100],
    ]


def test_dataset_rejects_a_label_the_training_set_did_not_have(char_tokenizer):
    with pytest.raises(ValueError, match="example 1 has label 'eggs', not one of \\['ham', 'spam'\\]"):
        ClassificationDataset([("a", "ham"), ("b", "eggs")], char_tokenizer, label_names=["ham", "spam"])


# --- the model ---------------------------------------------------------------------------


def test_make_classifier_unties_the_head_and_trains_only_the_default_parts():
    model = GPTModel(SMALL)
    embedding = model.tok_emb.weight.detach().clone()
    make_classifier(model, num_classes=3)
    assert model.out_head.weight.shape == (3, 16) and model.out_head.bias.shape == (3,)
    assert model.cfg.tie_weights is False and SMALL.tie_weights is True  # the preset is untouched
    assert torch.equal(model.tok_emb.weight, embedding)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters()
                         if name.startswith(("trf_blocks.1.", "final_norm.", "out_head."))}
    # Block: 4 x (16*16) attention + 16 out bias + 2 x 16*64 + 64 + 16 ff + 2 x 2*16 norms.
    block = 4 * 256 + 16 + 2 * 1024 + 64 + 16 + 4 * 16
    assert model.num_parameters(trainable_only=True) == block + 2 * 16 + (3 * 16 + 3)


def test_make_classifier_trains_the_named_modules():
    model = make_classifier(GPTModel(SMALL), 2, trainable=["out_head"])
    assert model.num_parameters(trainable_only=True) == 2 * 16 + 2
    model = make_classifier(GPTModel(SMALL), 2, trainable="all")
    assert model.num_parameters(trainable_only=True) == model.num_parameters()
    with pytest.raises(ValueError, match="no submodule 'trf_block.0'"):
        make_classifier(GPTModel(SMALL), 2, trainable=["trf_block.0"])


def test_padding_does_not_change_the_scores_of_a_text():
    model = make_classifier(GPTModel(SMALL), 2).eval()
    texts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    padded = torch.tensor([ids + [PAD] * (5 - len(ids)) for ids in texts])
    pooled = last_token_logits(model(padded), torch.tensor([5, 2, 3]))
    for row, ids in zip(pooled, texts, strict=True):
        alone = model(torch.tensor([ids]))[0, -1]
        assert torch.allclose(row, alone, atol=1e-6)
    # The book's choice, the last position, reads padding for the shorter texts.
    assert not torch.allclose(model(padded)[1, -1], pooled[1])


def test_last_token_logits_gathers_at_length_minus_one():
    logits = torch.arange(2 * 3 * 2.0).reshape(2, 3, 2)
    assert last_token_logits(logits, torch.tensor([3, 1])).tolist() == [[4.0, 5.0], [6.0, 7.0]]
    with pytest.raises(ValueError, match="lengths must be in"):
        last_token_logits(logits, torch.tensor([0, 1]))


class ParityModel(nn.Module):
    """Scores class ``id % 2`` at every position: predictions a reader can work out."""

    def forward(self, ids):
        return nn.functional.one_hot(ids % 2, 2).float()


def test_accuracy_reads_each_text_at_its_last_real_token(char_tokenizer):
    # Last real tokens: "b" (98, even -> 0), "aa" ends with 97 (odd -> 1), "c" (99 -> 1).
    examples = [("b", "0"), ("aa", "1"), ("c", "0")]
    loader = DataLoader(ClassificationDataset(examples, char_tokenizer), batch_size=2)
    assert calc_accuracy_loader(loader, ParityModel(), "cpu") == pytest.approx(2 / 3)
    assert calc_accuracy_loader(loader, ParityModel(), "cpu", num_batches=1) == 1.0


def test_classify_gives_the_same_class_alone_and_in_a_padded_batch(char_tokenizer):
    model = make_classifier(GPTModel(SMALL), 2).eval()
    texts = ["hello there", "a", "spam spam"]
    batch = classify_texts(texts, model, char_tokenizer, label_names=["ham", "spam"])
    assert batch == [classify(text, model, char_tokenizer, ["ham", "spam"]) for text in texts]


def test_saved_classifier_loads_with_its_labels_and_scores(tmp_path):
    model = make_classifier(GPTModel(SMALL), 2).eval()
    save_classifier(model, tmp_path / "clf", ["ham", "spam"])
    loaded, labels = load_classifier(tmp_path / "clf")
    ids = torch.randint(0, 50257, (2, 8))
    assert labels == ["ham", "spam"]
    assert torch.equal(loaded(ids), model(ids))


def test_evaluation_restores_the_mode_the_model_had(char_tokenizer):
    loader = DataLoader(ClassificationDataset([("b", "0"), ("aa", "1")], char_tokenizer), batch_size=2)
    model = ParityModel()
    calc_accuracy_loader(loader, model, "cpu")
    assert model.training
    classifier = make_classifier(GPTModel(SMALL), 2)
    classify_texts(["hi"], classifier, char_tokenizer)
    assert classifier.training
    classify_texts(["hi"], classifier.eval(), char_tokenizer)
    assert not classifier.training


def test_a_classifier_saved_with_other_labels_is_named_on_loading(tmp_path):
    save_classifier(make_classifier(GPTModel(SMALL), 2), tmp_path / "clf", ["ham", "spam"])
    (tmp_path / "clf" / LABELS_FILE).write_text(json.dumps({"label_names": ["a", "b", "c"]}))
    with pytest.raises(ValueError, match=r"out_head.weight: file has \(2, 16\), model expects \(3, 16\)"):
        load_classifier(tmp_path / "clf")
    with pytest.raises(ValueError, match="the head has 2 classes but 3 label names"):
        save_classifier(make_classifier(GPTModel(SMALL), 2), tmp_path / "other", ["a", "b", "c"])


def test_lora_on_a_classifier_trains_only_the_adapters_and_merges_back(tmp_path):
    model = make_classifier(GPTModel(SMALL), 2, trainable=[])
    report = apply_lora(model, rank=2, alpha=2)
    # rank 2 * (in + out) per linear: 4 attention (16 + 16), 2 feed-forward (16 + 64), head (16 + 2).
    assert report.trainable == model.num_parameters(trainable_only=True) == 2 * (2 * (4 * 32 + 2 * 80) + 18)
    ids = torch.randint(0, 50257, (2, 8))
    with torch.no_grad():
        model.out_head.lora.B.normal_()  # a trained-looking update, so merging has something to fold in
        expected = model.eval()(ids)
    merge_lora(model)
    save_classifier(model, tmp_path / "clf", ["a", "b"])
    loaded, labels = load_classifier(tmp_path / "clf")  # merged: plain linears again
    assert labels == ["a", "b"] and isinstance(loaded.out_head, nn.Linear)
    assert torch.allclose(loaded(ids), expected, atol=1e-5)


# --- learning ------------------------------------------------------------------------------


def test_a_small_random_gpt_learns_spam_far_above_chance(data_dir, tmp_path, one_thread, caplog):
    sms = load_labelled_texts("spam")
    train, val, test = split_examples(balance_classes(sms, seed=123), seed=123)
    tokenizer = get_gpt2_tokenizer()
    train_set = ClassificationDataset(train[:320], tokenizer, max_length=32)
    labels = train_set.label_names
    val_set = ClassificationDataset(val[:64], tokenizer, max_length=32, label_names=labels)
    test_set = ClassificationDataset(test[:200], tokenizer, max_length=32, label_names=labels)
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=64, n_heads=2, n_layers=2,
                    drop_rate=0.0, tie_weights=True)
    model = make_classifier(GPTModel(cfg), num_classes=2, trainable="all")
    with caplog.at_level(logging.INFO, logger="minigpt.training"):
        result = train_classifier(
            model, DataLoader(train_set, batch_size=16, shuffle=True, drop_last=True),
            DataLoader(val_set, batch_size=32), epochs=2, lr=1e-3, eval_every=20, eval_iter=2,
            device="cpu", progress=False, precision="float32",
        )
    assert "val loss" in caplog.text and "perplexity" not in caplog.text  # a loss over 2 classes, not the vocabulary
    # On balanced classes, always answering one class scores 50 %.
    assert result.accuracy_before["val"] < 0.65
    assert result.accuracy_after["train"] > 0.9
    assert result.accuracy_after["val"] > 0.8
    assert calc_accuracy_loader(DataLoader(test_set, batch_size=50), model, "cpu") > 0.8
    assert result.history.steps == [0, 20, 40]
    assert result.history.train_losses[-1] < 0.1  # guessing costs ln 2 = 0.69
    save_classifier(model, tmp_path / "clf", labels)
    loaded, loaded_labels = load_classifier(tmp_path / "clf")
    assert loaded_labels == ["ham", "spam"]
    assert classify("WINNER!! Claim your FREE prize now, call 09061701461", loaded, tokenizer,
                    loaded_labels, max_length=32) == "spam"


def test_a_llama_family_classifier_saves_and_loads_back(tmp_path):
    from minigpt.finetuning.classification import load_classifier, make_classifier, save_classifier
    from minigpt.models.llama.config import LlamaConfig
    from minigpt.models.llama.model import LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, context_length=16, emb_dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    model = make_classifier(LlamaModel(cfg), num_classes=3).eval()
    save_classifier(model, tmp_path, ["a", "b", "c"])
    loaded, labels = load_classifier(tmp_path)
    ids = torch.randint(0, 64, (2, 8))
    assert isinstance(loaded, LlamaModel) and labels == ["a", "b", "c"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
