"""Labelled texts: the SMS data as we read it (every message, quotes kept), the verified
local copy, CSV/TSV files with named columns and errors that name the line, balancing
and the book's split."""

import pytest

from minigpt.finetuning.labelled_data import (
    balance_classes,
    label_names_of,
    load_labelled_texts,
    read_labelled_file,
    read_sms_spam,
    split_examples,
)
from minigpt.io import sources
from minigpt.io.files import ChecksumError

# Files this module reads from the data folder (without it, from the copies minigpt ships).
DATA_FILES = ["sms_spam/SMSSpamCollection.tsv"]


@pytest.fixture
def sms(data_dir):
    return load_labelled_texts("spam")


def test_sms_spam_keeps_every_message_with_its_quotes(sms):
    assert len(sms) == 5574
    assert sum(label == "spam" for _, label in sms) == 747
    # Line 283 starts with a quote; a CSV reader would merge it with the lines after it.
    text, label = sms[282]
    assert label == "ham"
    assert text.startswith('"Wen u miss someone, the person is definitely special for u')
    assert text.endswith('" gdeve..')


def test_spam_is_read_from_the_data_folder_without_the_network(data_dir, only_localhost):
    assert load_labelled_texts("spam") == read_sms_spam(data_dir / sources.SMS_SPAM.relpath)


def test_a_local_collection_with_other_content_is_a_checksum_error(tmp_path, monkeypatch):
    local = tmp_path / "data" / sources.SMS_SPAM.relpath
    local.parent.mkdir(parents=True)
    local.write_text("ham\tnot the real collection\n")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(ChecksumError, match="SHA-256"):
        load_labelled_texts("spam")


def test_balanced_split_has_the_books_sizes_and_is_reproducible(sms):
    balanced = balance_classes(sms, seed=123)
    assert [label for _, label in balanced].count("ham") == 747
    assert [label for _, label in balanced].count("spam") == 747
    train, val, test = split_examples(balanced, 0.7, 0.1, seed=123)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    assert sorted(train + val + test) == sorted(balanced)
    assert split_examples(balanced, seed=123) == (train, val, test)
    assert split_examples(balanced, seed=1)[0] != train


def test_balance_keeps_the_file_order_and_the_smallest_class_whole():
    examples = [("a", "x"), ("b", "y"), ("c", "x"), ("d", "x"), ("e", "y")]
    balanced = balance_classes(examples, seed=0)
    assert [label for _, label in balanced].count("x") == 2
    assert [text for text, label in balanced if label == "y"] == ["b", "e"]
    assert balanced == [example for example in examples if example in balanced]


def test_split_rejects_fractions_that_leave_no_test_part():
    with pytest.raises(ValueError, match="train_frac \\+ val_frac < 1"):
        split_examples(list(range(10)), 0.8, 0.2)


def test_label_names_sort_as_numbers_when_they_are_numbers():
    assert label_names_of([("a", "spam"), ("b", "ham")]) == ["ham", "spam"]
    assert label_names_of([("a", "10"), ("b", "9"), ("c", "-1")]) == ["-1", "9", "10"]


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


def test_missing_file_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="use 'spam' or the path of a CSV/TSV file"):
        load_labelled_texts(tmp_path / "nowhere.csv")


def test_row_with_a_missing_field_names_its_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\nok,a\nno label here\n")
    with pytest.raises(ValueError, match="line 3: 1 fields, but the header has 2"):
        read_labelled_file(path)
