"""Every file minigpt can fetch, declared once: local name, public URL, SHA-256.

The one idea: a file is pinned by the SHA-256 of its content, so wherever a copy comes
from (the data folder, the package, the cache or the network, see ``minigpt.io.download``),
it is the same bytes. The names below are what the rest of minigpt passes to
``fetch``; ``PINNED_FILES`` lists them all by their local name.

Every file below ships inside the package (``minigpt/package_data``, each with its licence
and attribution beside it), so that nothing but model weights needs a network: GPT-2's BPE
(OpenAI's modified MIT licence), "The Verdict" and Tiny Shakespeare (public domain), the
instruction and preference data (Apache-2.0), the SMS Spam Collection (CC BY 4.0) and
WikiText-2's test split (CC BY-SA 3.0). The URL is where each came from; a copy in
``MINIGPT_DATA_DIR`` is read first.
"""

from __future__ import annotations

from minigpt.io.download import PinnedFile

_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
_BOOK = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"

# GPT-2's tokenizer: token -> id, and the 50,000 merges in the order they were learned.
GPT2_ENCODER_JSON = PinnedFile(
    "gpt2/encoder.json", f"{_GPT2}/encoder.json",
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
)
GPT2_VOCAB_BPE = PinnedFile(
    "gpt2/vocab.bpe", f"{_GPT2}/vocab.bpe",
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
)
# Edith Wharton, "The Verdict" (1908): the book's pretraining text, 20,479 characters.
THE_VERDICT = PinnedFile(
    "the-verdict.txt", f"{_BOOK}/ch02/01_main-chapter-code/the-verdict.txt",
    "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
)
# Shakespeare's plays concatenated (Karpathy's char-rnn): 1,115,394 characters.
TINY_SHAKESPEARE = PinnedFile(
    "tinyshakespeare.txt", "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
)
# SMS Spam Collection v.1 (CC BY 4.0, Almeida & Gómez Hidalgo, UCI ML Repository,
# doi:10.24432/C5CC84): "label<TAB>text" lines, a file inside UCI's zip archive.
SMS_SPAM = PinnedFile(
    "sms_spam/SMSSpamCollection.tsv", "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d", member="SMSSpamCollection",
)
# 1,100 Alpaca-style entries {instruction, input, output} (Apache-2.0).
INSTRUCTION_DATA = PinnedFile(
    "instruct/instruction-data.json", f"{_BOOK}/ch07/01_main-chapter-code/instruction-data.json",
    "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
)
# The same entries with a "chosen" and a "rejected" answer each, for preference tuning (Apache-2.0).
PREFERENCE_DATA = PinnedFile(
    "instruct/instruction-data-with-preference.json",
    f"{_BOOK}/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
    "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
)
# WikiText-2's test split, already word-tokenized (CC BY-SA 3.0): a held-out text for perplexity.
WIKITEXT2_TEST = PinnedFile(
    "wikitext2/wiki.test.tokens.txt",
    "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/test.txt",
    "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
)

PINNED_FILES: dict[str, PinnedFile] = {
    pinned.relpath: pinned
    for pinned in (
        GPT2_ENCODER_JSON, GPT2_VOCAB_BPE, THE_VERDICT, TINY_SHAKESPEARE,
        SMS_SPAM, INSTRUCTION_DATA, PREFERENCE_DATA, WIKITEXT2_TEST,
    )
}
