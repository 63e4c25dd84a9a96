"""The command line: every default shown by --help and taken from the jobs' settings,
errors in the user's words on a line of their own, a clean stop on Ctrl-C with the exact
command that resumes, and each sub-command end to end on tiny settings."""

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QuietHandler
from test_jobs import signal_after_step
from torch import nn

from minigpt import runtime
from minigpt.classification import classify, load_classifier
from minigpt.cli import build_parser, main
from minigpt.config import GPTConfig
from minigpt.hub import default_weights_dir
from minigpt.instruction import load_instruction_data
from minigpt.jobs import generate as generate_job
from minigpt.jobs.generate import GenerateConfig
from minigpt.jobs.pretrain import PretrainConfig
from minigpt.model import GPTModel
from minigpt.tokenizer import get_gpt2_tokenizer

# Files this module reads from the data folder (not shipped); tests that need them skip, naming them.
DATA_FILES = ["sms_spam/SMSSpamCollection.tsv", "instruct/instruction-data.json"]

REPO = Path(__file__).resolve().parents[1]
SMALL = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=2,
                  drop_rate=0.0, tie_weights=True)
SMALL_INSTRUCT = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2,
                           drop_rate=0.0, tie_weights=True)
TINY_RUN = ["--corpus", "the-verdict", "--context-length", "32", "--batch-size", "2", "--steps", "2",
            "--eval-every", "1", "--eval-iter", "1", "--warmup", "1", "--sample-tokens", "5", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here trains tiny models."""


def actions(parser: argparse.ArgumentParser, *path: str) -> list[argparse.Action]:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return [a for a in parser._actions if a.option_strings and a.dest not in ("help", "resume")]


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("path", [("generate",), ("pretrain",), ("eval",), ("finetune", "classify"),
                                  ("finetune", "instruct"), ("finetune", "dpo")])
def test_help_shows_every_default(path):
    for action in actions(build_parser(), *path):
        if action.dest != "overwrite" and not action.required:  # a switch, and the one option that must be given
            assert "(default: " in action.help, f"{path} {action.option_strings}"


def test_help_takes_its_defaults_from_the_settings(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = GenerateConfig()
    assert f"(default: {defaults.temperature})" in text and f"(default: {defaults.max_new_tokens})" in text
    assert "--top-k N sample only among the k likeliest tokens (default: no limit)" in text
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    loop = PretrainConfig().train
    for flag, value in (("--steps", loop.max_steps), ("--lr", loop.lr), ("--batch-size", PretrainConfig().batch_size),
                        ("--sample-temperature", loop.sample_temperature), ("--sample-top-k", loop.sample_top_k)):
        assert re.search(rf"{flag} \S+ .*?\(default: {value}\b", text), flag
    assert "--precision {auto,float32,bfloat16,float16} " in text and "(default: float32 on CPU, auto on CUDA)" in text


def test_download_help_names_the_real_default_folder(capsys):
    with pytest.raises(SystemExit):
        main(["download", "--help"])
    assert str(default_weights_dir()) in "".join(capsys.readouterr().out.split())


def test_options_left_out_are_not_in_the_namespace():
    args = build_parser("pretrain").parse_args(["pretrain", "--steps", "7", "--eval-iter", "none"])
    assert args.max_steps == 7 and args.eval_iter is None  # "none": the whole loaders
    assert not hasattr(args, "lr")  # the settings keep their own lr


# ---------------------------------------------------------------------------- generate


@pytest.mark.parametrize("option, value, words", [
    ("--temperature", "-1", "temperature must be 0"), ("--top-k", "0", "--top-k must be"),
    ("--top-p", "1.5", "--top-p must be"), ("--max-new-tokens", "-5", "--max-new-tokens must be 0 or more"),
    ("--prompt", "", "the prompt is empty"),
])
def test_bad_sampling_options_fail_before_the_model_loads_on_a_line_of_their_own(capsys, option, value, words):
    assert main(["generate", "--model", "no-such-model", option, value]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no prompt echoed before the error
    assert err.startswith("minigpt generate: error: ") and err.count("\n") == 1 and words in err


def test_streaming_never_prints_half_a_character(capsys, monkeypatch):
    tokenizer = get_gpt2_tokenizer()
    llama = tokenizer.encode("🦙!")
    assert len(llama) > 2  # the emoji is split over several byte tokens

    def stream(model, idx, max_new_tokens, **kwargs):
        import torch

        yield from (torch.tensor([[token]]) for token in llama)

    monkeypatch.setattr(generate_job, "stream_generate", stream)
    assert main(["generate", "--preset", "tiny", "--prompt", "Hi", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "Hi🦙!\n"


def test_a_prompt_longer_than_the_context_is_shortened_with_a_warning(capsys):
    prompt = " ".join(map(str, range(200)))  # "0 1 2 ... 199": 200 tokens; the tiny preset reads 128
    assert len(get_gpt2_tokenizer().encode(prompt)) == 200
    assert main(["generate", "--preset", "tiny", "--prompt", prompt, "--max-new-tokens", "1", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert err == "warning: the prompt has 200 tokens, more than the model's context of 128: its first 72 tokens " \
                  "were dropped\n"
    assert out.startswith(" " + " ".join(map(str, range(72, 200))))  # " 72 73 ... 199", then the new token


def test_generate_does_not_import_the_training_code():
    code = ("import sys; from minigpt.cli import main; "
            "assert main(['generate', '--preset', 'tiny', '--max-new-tokens', '2', '--device', 'cpu']) == 0; "
            "assert 'minigpt.training' not in sys.modules, 'training imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   capture_output=True, timeout=120)


# ---------------------------------------------------------------------------- info, download


def test_info_kernels_prints_the_choice_and_speed_of_each_decoding_product(capsys, monkeypatch):
    from minigpt import kernels

    monkeypatch.setenv(kernels.KERNEL_ENV, "measure")
    monkeypatch.setattr(kernels, "measure", lambda product: {"f_linear": 2e-3, "onednn": 1e-3})
    kernels._TABLES.clear()
    assert main(["info", "--kernels"]) == 0
    kernels._TABLES.clear()
    out = capsys.readouterr().out
    assert kernels.cpu_model() in out and "delete it to measure again" in out
    # gpt2-small's head at one row: 768 x 50,257 float32 weights read in the 1 ms oneDNN took
    row = next(line for line in out.splitlines() if line.startswith("forward float32 1x768->50257"))
    assert row.split()[3] == "onednn" and f"onednn {768 * 50257 * 4 / 1e-3 / 1e9:.1f} GB/s" in row
    assert "int4 float32 1x3072->768" in out and "forward bfloat16 1x768->3072" in out


def test_info_lists_every_preset(capsys):
    assert main(["info"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:7] == ["gpt2-small", "12", "12", "768", "1024", "163,009,536", "124,412,160"]
    gpt2, llama = "\n".join(rows[:-1]).split("\n\n")
    assert [row.split()[0] for row in gpt2.splitlines()[1:]] == ["gpt2-small", "gpt2-medium", "gpt2-large",
                                                                   "gpt2-xl", "tiny"]
    # The Llama family with the published parameter counts (SmolLM2-135M: 134,515,008, as transformers counts it)
    names = {row.split()[0]: row.split() for row in llama.splitlines()[1:]}
    assert list(names) == ["smollm2-135m", "smollm2-360m", "qwen3-0.6b", "llama-3.2-1b"]
    assert names["smollm2-135m"][1:6] == ["30", "9", "576", "8192", "134,515,008"]
    assert names["llama-3.2-1b"][5] == "1,235,814,400"


def test_offline_download_leaves_no_folder_and_says_where_to_put_which_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "gpt2-small", "--weights-dir", str(tmp_path / "weights")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "model.safetensors" in err and str(tmp_path / "weights") in err
    assert not (tmp_path / "weights").exists()


# ---------------------------------------------------------------------------- pretrain


def test_pretrain_writes_a_run_that_generate_eval_and_resume_use(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pretrain", *TINY_RUN, "--prompt", "Every effort", "--out-dir", str(tmp_path), "--name", "run"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert re.search(r"corpus the-verdict: 5,1\d\d tokens .* \| model tiny: [\d,]+ parameters \| device cpu \| "
                     r"precision float32 \| 2 steps", err)  # the banner
    final = re.search(r"validation loss (\d+\.\d+) over the whole validation split \(16 windows", out)
    assert final and "first sample (step 0, word pairs found in the corpus: " in out
    for name in ("config.json", "model.safetensors", "training_state.pt", "history.json",
                 "settings.json", "loss.png", "lr.png", "samples.txt"):
        assert (run / name).is_file(), name
    assert json.loads((run / "settings.json").read_text())["train"]["max_steps"] == 2
    assert "--- step 2" in (run / "samples.txt").read_text()

    assert main(["generate", "--checkpoint", str(run), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert main(["eval", "--checkpoint", str(run), "--batch-size", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"whole split: 16 windows of 32 tokens): loss {final.group(1)}," in out  # the same number

    assert main(args) == 2  # the run exists: no silent overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(["pretrain", "--resume", str(run), "--steps", "3"]) == 0  # nothing else needed
    assert len(json.loads((run / "history.json").read_text())["step_losses"]) == 3


def test_pretrain_without_precision_is_float32_even_where_the_cpu_has_fast_bfloat16(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "has_fast_bfloat16", lambda device, rows=256: True)
    assert main(["pretrain", *TINY_RUN, "--steps", "1", "--out-dir", str(tmp_path), "--name", "run"]) == 0
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["train"]["precision"] == "float32"
    assert json.loads((tmp_path / "run" / "history.json").read_text())["precision"] == "float32"


@pytest.mark.parametrize("extra, words", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--context-length", "1024"], "use a smaller --context-length, a larger --val-ratio or a larger corpus"),
    (["--corpus", "no-such-corpus"], "unknown corpus 'no-such-corpus'"),
])
def test_pretrain_errors_name_the_options(tmp_path, capsys, extra, words):
    assert main(["pretrain", *TINY_RUN, *extra, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert words in err and "max_steps" not in err and "TrainConfig" not in err
    assert not list(tmp_path.glob("*/training_state.pt"))


def test_a_corpus_that_is_not_utf8_is_named(tmp_path, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("Café au lait, très bien. ".encode("latin-1") * 50)
    assert main(["pretrain", *TINY_RUN, "--corpus", str(corpus), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(corpus) in err and "UTF-8" in err


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_pretrain_with_one_line_naming_the_resume_command(tmp_path, capsys, signum, code):
    args = ["pretrain", *TINY_RUN, "--steps", "5", "--out-dir", str(tmp_path), "--name", "run"]
    with signal_after_step(2, signum):
        assert main(args) == code
    out, err = capsys.readouterr()
    stop = [line for line in err.splitlines() if "Continue with" in line]
    assert len(stop) == 1 and stop[0].endswith(f"Continue with: minigpt pretrain --resume {tmp_path / 'run'} "
                                               "--device cpu")
    assert "Traceback" not in err and "done in" not in out
    assert main(stop[0].split("Continue with: minigpt ")[1].split()) == 0
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())["step_losses"]) == 5


@pytest.mark.slow
def test_ctrl_c_in_a_real_process_saves_and_the_resumed_run_repeats_the_uninterrupted_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "minigpt", "pretrain", *TINY_RUN, "--steps", "40", "--eval-every", "2",
            "--out-dir", str(tmp_path)]
    subprocess.run([*base, "--name", "whole"], check=True, env=env, capture_output=True, timeout=300)

    process = subprocess.Popen([*base, "--name", "cut"], env=env, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines = []
    for line in process.stderr:  # wait until training is under way
        lines.append(line)
        if re.search(r"\bstep\s+4 \|", line):
            process.send_signal(signal.SIGINT)
            break
    lines += process.stderr.readlines()
    assert process.wait(timeout=120) == 130, "".join(lines)
    resume = [line for line in lines if "Continue with: " in line]
    assert len(resume) == 1 and "Traceback" not in "".join(lines)
    command = resume[0].split("Continue with: ")[1].split()
    assert command[:3] == ["minigpt", "pretrain", "--resume"]
    subprocess.run([sys.executable, "-m", *command], check=True, env=env, capture_output=True, timeout=300)

    whole, cut = (json.loads((tmp_path / name / "history.json").read_text()) for name in ("whole", "cut"))
    assert len(cut["step_losses"]) == 40
    assert cut["step_losses"] == whole["step_losses"] and cut["val_losses"] == whole["val_losses"]


# ---------------------------------------------------------------------------- finetune


def test_cli_fine_tunes_the_tiny_preset_on_spam(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "classify", "--model", "tiny", "--data", "spam", "--subset", "400",
                 "--max-length", "32", "--epochs", "2", "--lr", "1e-3", "--trainable", "all",
                 "--output", str(out), "--device", "cpu", "--precision", "float32"])
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


def test_cli_with_lora_trains_only_the_adapters(tmp_path):
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


def test_cli_classifier_stops_on_ctrl_c_and_resumes(tmp_path, capsys):
    GPTModel(SMALL).save_pretrained(tmp_path / "base")
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(80)))
    out = tmp_path / "run"
    args = ["finetune", "classify", "--model", str(tmp_path / "base"), "--data", str(data), "--epochs", "2",
            "--batch-size", "4", "--eval-every", "2", "--eval-iter", "1", "--output", str(out), "--device", "cpu"]
    with signal_after_step(2):
        assert main(args) == 130
    err = capsys.readouterr().err
    assert f"Continue with: minigpt finetune classify --resume {out}" in err and "Traceback" not in err
    assert main(["finetune", "classify", "--resume", str(out)]) == 0
    assert (out / "metrics.json").is_file()
    assert len(json.loads((out / "history.json").read_text())["step_losses"]) == 2 * 56 // 4


def instruct_run(model_dir, out, *extra):
    return main(["finetune", "instruct", "--model", str(model_dir), "--subset", "20", "--epochs", "1",
                 "--lr", "1e-3", "--max-new-tokens", "3", "--output", str(out), "--device", "cpu",
                 "--precision", "float32", *extra])


def test_cli_without_a_judge_says_so_and_reports_loss_and_perplexity(data_dir, tmp_path, capsys):
    GPTModel(SMALL_INSTRUCT).save_pretrained(tmp_path / "base")
    assert instruct_run(tmp_path / "base", tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "no judge given (--judge-model or --judge-url)" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["examples"] == {"train": 17, "val": 1, "test": 2}
    assert metrics["judge_score"] is None
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))
    assert f"perplexity {metrics['test_perplexity']:,.1f}" in out
    responses = json.loads((tmp_path / "run" / "responses.json").read_text())
    assert [r["output"] for r in responses] == [e["output"] for e in load_instruction_data()[17:19]]
    assert GPTModel.from_pretrained(tmp_path / "run").cfg == SMALL_INSTRUCT


class ChatHandler(QuietHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_json({"message": {"role": "assistant", "content": "75"}})


def test_cli_scores_the_answers_with_an_http_judge(data_dir, tmp_path, capsys, http_server, only_localhost):
    GPTModel(SMALL_INSTRUCT).save_pretrained(tmp_path / "base")
    server = http_server(ChatHandler)
    assert instruct_run(tmp_path / "base", tmp_path / "run", "--judge-url", server.url("/api/chat")) == 0
    assert len(server.requests) == 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["judge_score"] == 75
    assert "judge score 75.0 / 100 over 2 of 2 responses" in capsys.readouterr().out


def test_cli_names_the_malformed_entry(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c"}]))
    assert main(["finetune", "instruct", "--model", "tiny", "--data", str(data), "--output", str(tmp_path)]) == 2
    assert "entry 1 has no 'output' field" in capsys.readouterr().err


@pytest.mark.parametrize("task, settings", [("classify", "minigpt.jobs.classify.ClassifyConfig"),
                                            ("instruct", "minigpt.jobs.instruct.InstructConfig"),
                                            ("dpo", "minigpt.jobs.dpo.DPOConfig")])
def test_finetune_settings_cover_every_option(task, settings):
    module, name = settings.rsplit(".", 1)
    flags = {a.dest for a in actions(build_parser(), "finetune", task)}
    assert flags == {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
