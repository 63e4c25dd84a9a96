"""minigpt.evaluation.harness and the job behind ``minigpt eval --tasks``: lm-evaluation-harness's requests
answered by a minigpt model.

The reference is the harness's own Hugging Face backend (``HFLM``) on the same weights,
exported with ``export_hf``: log-likelihoods, rolling log-likelihoods and greedy generations
must agree. Everything runs offline: the tasks are YAML files in tests/harness_tasks that
read local JSON Lines files.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install 'minigpt[eval]'")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from minigpt.evaluation.harness import MiniGPTLM  # noqa: E402
from minigpt.generation.generate import generate  # noqa: E402
from minigpt.jobs.harness import HarnessConfig, _check_task_names, results_table, run_tasks  # noqa: E402
from minigpt.models.gpt2.hf_layout import export_hf  # noqa: E402
from minigpt.models.gpt2.model import GPTModel  # noqa: E402
from minigpt.tokenizers.bpe import gpt2_bpe_files  # noqa: E402

TASKS = Path(__file__).parent / "harness_tasks"
ALL_TASKS = ["minigpt_choice", "minigpt_generate", "minigpt_perplexity"]
# A context of 32 tokens: long prompts get truncated and long texts take several windows.
TINY = dict(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
            qkv_bias=True, tie_weights=False)
TOLERANCE = 1e-4
LONG_TEXT = ("I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough--so it was no "
             "great surprise to me to hear that, in the height of his glory, he had dropped his painting, married "
             "a rich widow, and established himself in a villa on the Riviera. ") * 2

pytestmark = pytest.mark.usefixtures("one_thread", "offline")


@pytest.fixture
def offline(monkeypatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(TINY).eval()


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory) -> Path:
    """The same weights as a Hugging Face GPT-2 directory, with GPT-2's tokenizer files."""
    directory = export_hf(model, tmp_path_factory.mktemp("hf"))
    encoder_json, vocab_bpe = gpt2_bpe_files()
    shutil.copy(encoder_json, directory / "vocab.json")
    shutil.copy(vocab_bpe, directory / "merges.txt")
    return directory


@pytest.fixture(scope="module")
def ours(model) -> MiniGPTLM:
    return MiniGPTLM(model, batch_size=3, device="cpu")


@pytest.fixture(scope="module")
def theirs(hf_dir):
    pytest.importorskip("accelerate", reason="the harness's Hugging Face backend imports accelerate")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), batch_size=2, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tasks() -> TaskManager:
    return TaskManager(include_path=str(TASKS), include_defaults=False)


def requests(kind: str, *arguments: tuple) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def samples(lm, tasks: TaskManager, names: list[str] = ALL_TASKS) -> dict:
    return simple_evaluate(model=lm, tasks=names, task_manager=tasks, log_samples=True, bootstrap_iters=0)


def answers(result: dict, task: str) -> list:
    """Every response of a task, flattened in document order."""
    by_doc = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [answer for sample in by_doc for resp in sample["resps"] for answer in resp]


def max_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------- parity with HFLM

def test_local_tasks_equal_the_hugging_face_backend(ours, theirs, tasks):
    mine, reference = samples(ours, tasks), samples(theirs, tasks)
    choice_ours, choice_ref = answers(mine, "minigpt_choice"), answers(reference, "minigpt_choice")
    assert len(choice_ours) == 17  # every choice of the 5 questions
    assert max_difference([a[0] for a in choice_ours], [a[0] for a in choice_ref]) < TOLERANCE
    assert [a[1] for a in choice_ours] == [a[1] for a in choice_ref]
    rolling = max_difference(answers(mine, "minigpt_perplexity"), answers(reference, "minigpt_perplexity"))
    assert rolling < TOLERANCE
    assert answers(mine, "minigpt_generate") == answers(reference, "minigpt_generate")
    for task in ALL_TASKS:
        for metric, value in mine["results"][task].items():
            if isinstance(value, float):
                assert value == pytest.approx(reference["results"][task][metric], rel=1e-5), (task, metric)


def test_loglikelihood_equals_the_hugging_face_backend(ours, theirs):
    pairs = requests(
        "loglikelihood",
        ("The capital of France is", " Paris"),
        ("The capital of France is ", "Paris"),  # the space moves into the continuation
        ("", "An empty context is read after <|endoftext|>"),
        (LONG_TEXT, " and a long context keeps its end"),  # more than 32 tokens: cut on the left
        ("Question: 2 + 2 =", " 4<|endoftext|>"),
    )
    mine, reference = ours.loglikelihood(pairs), theirs.loglikelihood(pairs)
    assert max_difference([a[0] for a in mine], [a[0] for a in reference]) < TOLERANCE
    assert [a[1] for a in mine] == [a[1] for a in reference]


def test_loglikelihood_rolling_equals_the_hugging_face_backend(ours, theirs):
    texts = requests("loglikelihood_rolling", (LONG_TEXT,), ("Short.",), (LONG_TEXT[:150],), ("",))
    assert len(ours.tok_encode(LONG_TEXT)) > 3 * ours.max_length  # several windows
    mine, reference = ours.loglikelihood_rolling(texts), theirs.loglikelihood_rolling(texts)
    assert max_difference(mine, reference) < TOLERANCE
    assert mine[-1] == 0.0  # an empty text has no token to predict


def test_greedy_flag_marks_the_greedy_continuation(model, ours, theirs):
    context = ours.tok_encode("Every effort moves you")
    greedy = generate(model, torch.tensor([context]), 5)[0, len(context):].tolist()
    other = greedy[:2] + [(greedy[2] + 1) % TINY["vocab_size"]] + greedy[3:]
    token_requests = [(None, context, greedy), (None, context, other)]
    mine = ours._loglikelihood_tokens(token_requests)
    assert [is_greedy for _, is_greedy in mine] == [True, False]
    assert mine[0][0] > mine[1][0]
    reference = theirs._loglikelihood_tokens(token_requests)
    assert max_difference([a[0] for a in mine], [a[0] for a in reference]) < TOLERANCE
    assert [a[1] for a in reference] == [True, False]


# ---------------------------------------------------------------------------- generation

def greedy_text(model, lm: MiniGPTLM, context: str, tokens: int) -> list[int]:
    ids = lm.tok_encode(context)
    return generate(model, torch.tensor([ids]), tokens)[0, len(ids):].tolist()


def test_generate_until_honours_max_gen_toks_and_until(model, ours, theirs):
    context = "Every effort moves you"
    new = greedy_text(model, ours, context, 8)
    stop = ours.tok_decode(new[3:4])  # the text of the 4th new token
    full = ours.tok_decode(new[:6])
    assert stop not in ours.tok_decode(new[:3])
    six_tokens = {"until": [], "max_gen_toks": 6, "do_sample": False}
    gens = requests(
        "generate_until",
        (context, six_tokens),
        (context, {"until": [stop], "max_gen_toks": 6, "do_sample": False}),
        ("A longer prompt, batched with the first one, which is padded: " + context, six_tokens),
        (LONG_TEXT, six_tokens),  # longer than the context: keeps its last 32 - 6 tokens
    )
    mine = ours.generate_until(gens)
    assert mine[0] == full
    assert mine[1] == full.split(stop)[0]
    assert mine == theirs.generate_until(gens)


def test_generation_stops_once_every_row_has_its_stop(model, ours):
    context = "Every effort moves you"
    new = greedy_text(model, ours, context, 3)
    assert ours.tok_decode(new[1:2]) not in ours.tok_decode(new[:1])
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        text = ours.generate_until(requests("generate_until", (context, {"until": [ours.tok_decode(new[1:2])],
                                                                         "max_gen_toks": 20})))
    finally:
        handle.remove()
    assert text == [ours.tok_decode(new[:1])]
    assert len(calls) == 2  # the prompt, then one step: not the 20 tokens allowed


def test_sampling_follows_the_seed(ours):
    gens = requests("generate_until", ("Once upon a time", {"do_sample": True, "temperature": 1.0,
                                                            "max_gen_toks": 5}))
    torch.manual_seed(1)
    first = ours.generate_until(gens)
    torch.manual_seed(1)
    assert ours.generate_until(gens) == first
    greedy = ours.generate_until(requests("generate_until", ("Once upon a time", {"max_gen_toks": 5})))
    assert first != greedy


def test_a_generation_longer_than_the_context_is_refused(ours):
    with pytest.raises(ValueError, match="max_gen_toks is 32"):
        ours.generate_until(requests("generate_until", ("Hello", {"max_gen_toks": 32})))


# ---------------------------------------------------------------------------- loading, registry, settings

def test_registered_name_loads_directories(model, ours, hf_dir, tasks, tmp_path):
    assert get_model("minigpt") is MiniGPTLM
    model.save_pretrained(tmp_path / "weights")
    expected = answers(samples(ours, tasks, ["minigpt_choice"]), "minigpt_choice")
    by_name = simple_evaluate(model="minigpt", model_args=f"pretrained={tmp_path / 'weights'},batch_size=4",
                              device="cpu", tasks=["minigpt_choice"], task_manager=tasks, log_samples=True)
    assert answers(by_name, "minigpt_choice") == expected
    from_hf = MiniGPTLM(str(hf_dir), device="cpu")
    assert max_difference([a[0] for a in answers(samples(from_hf, tasks, ["minigpt_choice"]), "minigpt_choice")],
                          [a[0] for a in expected]) < TOLERANCE


@pytest.mark.slow
def test_the_harness_command_line_sees_minigpt(model, tmp_path):
    model.save_pretrained(tmp_path / "weights")
    command = [sys.executable, "-m", "minigpt.evaluation.harness", "run", "--model", "minigpt", "--model_args",
               f"pretrained={tmp_path / 'weights'}", "--tasks", "minigpt_choice", "--include_path", str(TASKS),
               "--device", "cpu", "--batch_size", "4"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "|minigpt_choice" in run.stdout and "acc_norm" in run.stdout


@pytest.mark.parametrize(("settings", "message"), [
    (dict(batch_size="auto"), "batch_size must be a whole number"),
    (dict(max_length=33), "more than the model's context of 32"),
    (dict(dtype="float8"), "dtype must be one of"),
    (dict(quantize="int8"), "quantize applies to weights loaded by name or directory"),
])
def test_bad_settings_are_named(model, settings, message):
    with pytest.raises(ValueError, match=message):
        MiniGPTLM(model, **settings)


def test_import_without_the_harness_says_how_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if lm-eval were not installed
    monkeypatch.delitem(sys.modules, "minigpt.evaluation.harness")
    with pytest.raises(ImportError, match=r'pip install "minigpt\[eval\]"'):
        import minigpt.evaluation.harness  # noqa: F401


def test_run_tasks_job(model, tmp_path):
    model.save_pretrained(tmp_path / "weights")
    settings = HarnessConfig(checkpoint=str(tmp_path / "weights"), tasks="minigpt_choice, minigpt_generate",
                             include_path=str(TASKS), limit=3, batch_size=4, device="cpu", quantize="int8",
                             output=str(tmp_path / "results.json"))
    results = run_tasks(settings)
    assert set(results["results"]) == {"minigpt_choice", "minigpt_generate"}
    assert results["config"]["quantization"]["scheme"] == "int8"
    assert results["results"]["minigpt_choice"]["sample_len"] == 3
    assert '"minigpt_generate"' in (tmp_path / "results.json").read_text(encoding="utf-8")
    table = results_table(results)
    assert "minigpt_choice" in table and "acc_norm" in table and "exact_match" in table


def test_job_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="tasks is empty"):
        HarnessConfig(checkpoint="gpt2-small", tasks=" , ")
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        HarnessConfig(checkpoint="gpt2-small", tasks="hellaswag", quantize="int3")
    with pytest.raises(ValueError, match="limit must be more than 0"):
        HarnessConfig(checkpoint="gpt2-small", tasks="hellaswag", limit=0)
    with pytest.raises(FileNotFoundError, match="is not a folder of task YAML files"):
        HarnessConfig(checkpoint="gpt2-small", tasks="hellaswag", include_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no tasks given"):
        run_tasks(HarnessConfig(checkpoint="gpt2-small"))
    with pytest.raises(ValueError, match="did you mean hellaswag"):
        _check_task_names(["hellaswg"], ["arc_easy", "hellaswag"])
