"""Classification fine-tuning: the SMS data as we read it, datasets with the label at the
last real token, head surgery and freezing, padding-proof pooling, and a classifier that
really learns spam from the real data."""

import functools
import http.server
import json
import threading
import zipfile

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from minigpt import classification
from minigpt.classification import (
    ClassificationDataset,
    balance_classes,
    calc_accuracy_loader,
    classify,
    classify_texts,
    last_token_logits,
    load_classifier,
    load_labelled_texts,
    make_classifier,
    read_labelled_file,
    read_sms_spam,
    save_classifier,
    sms_spam_path,
    split_examples,
    train_classifier,
)
from minigpt.cli import main
from minigpt.config import GPTConfig
from minigpt.download import ChecksumError
from minigpt.model import GPTModel
from minigpt.tokenizer import get_gpt2_tokenizer

PAD = 50256
SMALL = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=2,
                  drop_rate=0.0, tie_weights=True)


class CharTokenizer:
    """One id per character (its code point): token ids a reader can compute by hand."""

    def encode(self, text, allowed_special=()):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


@pytest.fixture(scope="module")
def sms(data_path):
    return read_sms_spam(sms_spam_path())


# --- data --------------------------------------------------------------------------------


def test_sms_spam_keeps_every_message_with_its_quotes(sms):
    assert len(sms) == 5574
    assert sum(label == "spam" for _, label in sms) == 747
    # Line 283 starts with a quote; a CSV reader would merge it with the lines after it.
    text, label = sms[282]
    assert label == "ham"
    assert text.startswith('"Wen u miss someone, the person is definitely special for u')
    assert text.endswith('" gdeve..')


@pytest.fixture
def uci_zip_server(tmp_path, monkeypatch):
    """Serves ``sms.zip`` from a folder on 127.0.0.1, pointed to by the download URL;
    the data folder is emptied, so the loader has to download."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(classification, "SMS_SPAM_ZIP_URL", f"http://127.0.0.1:{server.server_address[1]}/sms.zip")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path / "empty"))
    yield folder / "sms.zip"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_download_extracts_and_verifies_the_collection(data_path, uci_zip_server):
    tsv = (data_path / "sms_spam" / "SMSSpamCollection.tsv").read_bytes()
    with zipfile.ZipFile(uci_zip_server, "w") as zf:
        zf.writestr("SMSSpamCollection", tsv)
        zf.writestr("readme", "about the data")
    path = sms_spam_path()
    assert path.read_bytes() == tsv and "cache" in path.parts
    uci_zip_server.unlink()  # the second call finds the extracted copy in the cache
    assert sms_spam_path() == path


def test_download_with_other_content_is_a_checksum_error(uci_zip_server):
    with zipfile.ZipFile(uci_zip_server, "w") as zf:
        zf.writestr("SMSSpamCollection", "ham\tnot the real collection\n")
    with pytest.raises(ChecksumError, match="does not have the expected SHA-256"):
        sms_spam_path()


def test_balanced_split_has_the_books_sizes_and_is_reproducible(sms):
    balanced = balance_classes(sms, seed=123)
    assert [label for _, label in balanced].count("ham") == 747
    assert [label for _, label in balanced].count("spam") == 747
    train, val, test = split_examples(balanced, 0.7, 0.1, seed=123)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    assert sorted(train + val + test) == sorted(balanced)
    assert split_examples(balanced, seed=123) == (train, val, test)
    assert split_examples(balanced, seed=1)[0] != train


def test_malformed_sms_line_is_named_by_its_number(tmp_path):
    path = tmp_path / "sms.tsv"
    path.write_text("ham\tfine\nspam\tWIN NOW\nhello there\n")
    with pytest.raises(ValueError, match="line 3"):
        read_sms_spam(path)


def test_csv_with_quoted_commas_and_named_columns(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('id,review,sentiment\n1,"Great, really great",pos\n2,Dull,neg\n')
    assert read_labelled_file(path, "review", "sentiment") == [("Great, really great", "pos"), ("Dull", "neg")]


def test_missing_label_column_lists_the_columns(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("text\tcategory\nhello\ta\n")
    with pytest.raises(ValueError, match=r"no column 'label'; its columns are \['text', 'category'\]"):
        load_labelled_texts(path)


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_labelled_texts(path)


def test_row_with_a_missing_field_names_its_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\nok,a\nno label here\n")
    with pytest.raises(ValueError, match="line 3: 1 fields, but the header has 2"):
        read_labelled_file(path)


def test_dataset_truncates_pads_and_puts_the_label_at_the_last_real_token():
    examples = [("abc", "spam"), ("hello", "ham"), ("x", "ham")]
    dataset = ClassificationDataset(examples, CharTokenizer(), max_length=4)
    assert dataset.label_names == ["ham", "spam"]
    assert dataset.max_length == 4  # "hello" cut to "hell"
    inputs, targets = zip(*(dataset[i] for i in range(3)))
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


def test_dataset_rejects_a_label_the_training_set_did_not_have():
    with pytest.raises(ValueError, match="example 1 has label 'eggs', not one of \\['ham', 'spam'\\]"):
        ClassificationDataset([("a", "ham"), ("b", "eggs")], CharTokenizer(), label_names=["ham", "spam"])


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
    for row, ids in zip(pooled, texts):
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


def test_accuracy_reads_each_text_at_its_last_real_token():
    # Last real tokens: "b" (98, even -> 0), "aa" ends with 97 (odd -> 1), "c" (99 -> 1).
    examples = [("b", "0"), ("aa", "1"), ("c", "0")]
    loader = DataLoader(ClassificationDataset(examples, CharTokenizer()), batch_size=2)
    assert calc_accuracy_loader(loader, ParityModel(), "cpu") == pytest.approx(2 / 3)
    assert calc_accuracy_loader(loader, ParityModel(), "cpu", num_batches=1) == 1.0


def test_classify_gives_the_same_class_alone_and_in_a_padded_batch():
    model = make_classifier(GPTModel(SMALL), 2).eval()
    texts = ["hello there", "a", "spam spam"]
    batch = classify_texts(texts, model, CharTokenizer(), label_names=["ham", "spam"])
    assert batch == [classify(text, model, CharTokenizer(), ["ham", "spam"]) for text in texts]


def test_saved_classifier_loads_with_its_labels_and_scores(tmp_path):
    model = make_classifier(GPTModel(SMALL), 2).eval()
    save_classifier(model, tmp_path / "clf", ["ham", "spam"])
    loaded, labels = load_classifier(tmp_path / "clf")
    ids = torch.randint(0, 50257, (2, 8))
    assert labels == ["ham", "spam"]
    assert torch.equal(loaded(ids), model(ids))


# --- learning ------------------------------------------------------------------------------


def test_a_small_random_gpt_learns_spam_far_above_chance(sms, one_thread):
    train, val, test = split_examples(balance_classes(sms, seed=123), seed=123)
    tokenizer = get_gpt2_tokenizer()
    train_set = ClassificationDataset(train[:320], tokenizer, max_length=32)
    labels = train_set.label_names
    val_set = ClassificationDataset(val[:64], tokenizer, max_length=32, label_names=labels)
    test_set = ClassificationDataset(test[:200], tokenizer, max_length=32, label_names=labels)
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=64, n_heads=2, n_layers=2,
                    drop_rate=0.0, tie_weights=True)
    model = make_classifier(GPTModel(cfg), num_classes=2, trainable="all")
    result = train_classifier(
        model, DataLoader(train_set, batch_size=16, shuffle=True, drop_last=True),
        DataLoader(val_set, batch_size=32), epochs=2, lr=1e-3, eval_every=20, eval_iter=2,
        device="cpu", progress=False,
    )
    # On balanced classes, always answering one class scores 50 %.
    assert result.accuracy_before["val"] < 0.65
    assert result.accuracy_after["train"] > 0.9
    assert result.accuracy_after["val"] > 0.8
    assert calc_accuracy_loader(DataLoader(test_set, batch_size=50), model, "cpu") > 0.8
    assert result.history.steps == [0, 20, 40]
    assert result.history.train_losses[-1] < 0.1  # guessing costs ln 2 = 0.69


# --- the command line ----------------------------------------------------------------------


def test_cli_fine_tunes_the_tiny_preset_on_spam(data_path, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    code = main(["finetune", "classify", "--model", "tiny", "--data", "spam", "--subset", "400",
                 "--max-length", "32", "--epochs", "2", "--lr", "1e-3", "--trainable", "all",
                 "--output", str(out), "--device", "cpu"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["examples"] == {"train": 280, "val": 40, "test": 80}
    assert metrics["accuracy"]["test"] > 0.8
    assert f"test {metrics['accuracy']['test']:.1%}" in capsys.readouterr().out
    assert (out / "loss.png").stat().st_size > 0 and (out / "accuracy.png").stat().st_size > 0
    model, labels = load_classifier(out)
    assert labels == ["ham", "spam"]
    assert classify("WINNER!! Claim your FREE prize now, call 09061701461", model, get_gpt2_tokenizer(),
                    labels, max_length=32) == "spam"


def test_cli_with_lora_trains_only_the_adapters(tmp_path, one_thread):
    GPTModel(SMALL).save_pretrained(tmp_path / "base")
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(40)))
    out = tmp_path / "run"
    code = main(["finetune", "classify", "--model", str(tmp_path / "base"), "--data", str(data),
                 "--lora-rank", "2", "--epochs", "1", "--output", str(out), "--device", "cpu"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # rank 2 * (in + out) per linear: 4 attention (16 + 16), 2 feed-forward (16 + 64), head (16 + 2).
    assert metrics["trainable_parameters"] == 2 * (2 * (4 * 32 + 2 * 80) + 18)
    model, labels = load_classifier(out)  # merged: plain linears again
    assert labels == ["a", "b"] and isinstance(model.out_head, nn.Linear)


def test_cli_names_a_missing_label_column(tmp_path, capsys):
    data = tmp_path / "data.tsv"
    data.write_text("text\tcategory\nhello\ta\n")
    code = main(["finetune", "classify", "--model", "tiny", "--data", str(data), "--output", str(tmp_path)])
    assert code == 2
    assert "has no column 'label'; its columns are ['text', 'category']" in capsys.readouterr().err


def test_cli_rejects_an_empty_file(tmp_path, capsys):
    data = tmp_path / "data.csv"
    data.write_text("")
    assert main(["finetune", "classify", "--model", "tiny", "--data", str(data), "--output", str(tmp_path)]) == 2
    assert "is empty" in capsys.readouterr().err
