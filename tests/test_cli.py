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
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QuietHandler
from test_jobs import signal_after_step
from torch import nn

from minigpt.cli import build_parser, main
from minigpt.finetuning.classification import classify, load_classifier
from minigpt.finetuning.instruction import load_instruction_data
from minigpt.io.hub import default_weights_dir
from minigpt.jobs import generate as generate_job
from minigpt.jobs.generate import GenerateConfig
from minigpt.jobs.pretrain import PretrainConfig
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.runtime import runtime
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer

# Files this module reads from the data folder (without it, from the copies minigpt ships).
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
                                  ("finetune", "instruct"), ("finetune", "dpo"), ("finetune", "grpo")])
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
    assert "--top-k N sample only among the k likeliest tokens (default: 40)" in text
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


def test_a_mistyped_option_gets_the_sub_command_s_usage_and_the_closest_option(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--temprature", "0.5"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: minigpt generate ")  # not the top level's usage
    assert "unrecognized arguments: --temprature 0.5 (did you mean --temperature?)" in err
    with pytest.raises(SystemExit):
        main(["finetune", "dpo", "--lora-rnk", "8"])
    err = capsys.readouterr().err
    assert err.startswith("usage: minigpt finetune dpo ") and "(did you mean --lora-rank?)" in err


@pytest.mark.parametrize("command", [["generate", "--model"], ["eval", "--checkpoint"],
                                     ["compare", "--adapter", "adapter.safetensors", "--base"]])
def test_a_mistyped_model_name_gets_the_closest_name_and_every_known_one(command, capsys):
    assert main([*command, "gpt2-smal", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "'gpt2-smal' is not a model minigpt knows: did you mean 'gpt2-small'?" in err
    assert "gpt2-xl" in err and "smollm2-135m" in err and "qwen3-0.6b" in err  # the Llama family too


def test_a_run_that_does_not_exist_is_not_found(capsys):
    assert main(["eval", "--checkpoint", "runs/does-not-exist", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "runs/does-not-exist not found" in err and "corpus" not in err


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_serve_and_chat_show_their_options_without_the_serve_extra(command):
    code = ("import sys\n"
            "for name in ('fastapi', 'uvicorn', 'pydantic', 'starlette'): sys.modules[name] = None  # not installed\n"
            f"from minigpt.cli import main; main(['{command}', '--help'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    help = " ".join(result.stdout.split())
    assert "--model TEXT" in help and "--preset" in help
    if command == "serve":  # the server needs the extra: the help says which
        assert "--port N" in help and "It needs FastAPI and uvicorn: pip install 'minigpt[serve]'." in help
    else:  # the terminal chat needs none of it
        assert "--temperature X" in help and "pip install" not in help


def test_chat_answers_without_the_serve_extra():
    code = ("import sys\n"
            "for name in ('fastapi', 'uvicorn', 'pydantic', 'starlette'): sys.modules[name] = None  # not installed\n"
            "from minigpt.cli import main; sys.exit(main(['chat', '--max-tokens', '3', '--device', 'cpu']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            input="Hello\n", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "you> model> " in result.stdout  # one answer, then Ctrl-D (the end of the input) leaves


def test_serve_on_a_busy_port_fails_before_it_announces_anything(capsys):
    pytest.importorskip("uvicorn", reason="the serve extra")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1 port {port}: Address already in use; choose another port" in err
    assert "serving" not in err


def offline_commands() -> list[str]:
    """The commands of the README's blocks marked ``<!-- offline -->`` (the ones CI runs without network)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- offline -->\n```bash\n(.*?)```", readme, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("minigpt ")]


def test_every_offline_readme_command_parses_and_names_no_hub_model():
    from minigpt.io.hub import GPT2_REPOS
    from minigpt.io.hub_llama import LLAMA_REPOS

    commands = offline_commands()
    named = {" ".join(c.split()[1:3]) if " finetune " in c else c.split()[1] for c in commands}
    assert named >= {"generate", "eval", "info", "finetune instruct", "finetune dpo", "finetune classify", "compare",
                     "serve", "chat"}
    for command in commands:
        argv = shlex.split(command)[1:]
        args, extras = build_parser(argv[0]).parse_known_args(argv)
        assert not extras, command
        assert not set(argv) & {*GPT2_REPOS, *LLAMA_REPOS}, command  # those need the hub
        assert "--temperature" not in argv, command  # the defaults show text


# ---------------------------------------------------------------------------- generate


def newline_model(path: Path) -> Path:
    """A model whose likeliest next token is always "\n" (as a briefly pretrained one's often
    is), with a few words close behind: greedy decoding of it writes nothing but newlines."""
    tokenizer = get_gpt2_tokenizer()
    model = GPTModel(dataclasses.replace(SMALL, tie_weights=False))
    with torch.no_grad():
        model.final_norm.scale.zero_()  # the last hidden state is the shift, whatever the input
        model.final_norm.shift.fill_(1.0)
        model.out_head.weight.zero_()  # logit of token t = the sum of out_head.weight[t]
        model.out_head.weight[tokenizer.encode(" the cat sat on a mat and the dog ran home")] = 1.0 / SMALL.emb_dim
        model.out_head.weight[tokenizer.encode("\n")] = 2.0 / SMALL.emb_dim
    model.save_pretrained(path)
    return path


def test_the_command_line_tools_sample_by_default_and_the_library_stays_greedy():
    import inspect

    from minigpt.generation.generate import generate
    from minigpt.serving.chat import ChatConfig

    assert (GenerateConfig().temperature, GenerateConfig().top_k) == (0.8, 40)
    assert ChatConfig().temperature > 0 and ChatConfig().top_k == 50
    page = (REPO / "minigpt" / "serving" / "static" / "index.html").read_text()
    assert 'id="temperature" type="range" min="0" max="2" step="0.05" value="0.7"' in page  # the chat's defaults
    assert 'id="top-k" type="range" min="0" max="100" step="1" value="50"' in page
    assert inspect.signature(generate).parameters["temperature"].default == 0.0


def test_generate_shows_text_on_the_default_run_where_greedy_shows_only_newlines(tmp_path, capsys):
    model = str(newline_model(tmp_path / "model"))
    assert main(["generate", "--model", model, "--prompt", "First Citizen:", "--temperature", "0",
                 "--device", "cpu"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("First Citizen:") and greedy.removeprefix("First Citizen:").strip() == ""
    assert main(["generate", "--model", model, "--prompt", "First Citizen:", "--device", "cpu"]) == 0  # defaults
    sampled = capsys.readouterr().out.removeprefix("First Citizen:")
    assert len(re.findall(r"[a-z]+", sampled)) >= 10  # words, not only newlines


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
            "assert 'minigpt.training.loop' not in sys.modules, 'training imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   capture_output=True, timeout=120)


# ---------------------------------------------------------------------------- info, download


def test_info_kernels_prints_the_choice_and_speed_of_each_decoding_product(capsys, monkeypatch):
    from minigpt.runtime import kernels

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


def test_a_mistyped_download_name_gets_the_closest_and_every_name(tmp_path, capsys):
    assert main(["download", "gpt2-smal", "--weights-dir", str(tmp_path / "weights")]) == 2
    err = capsys.readouterr().err
    assert "'gpt2-smal' is not a published checkpoint: did you mean 'gpt2-small'?" in err
    assert "gpt2-xl" in err and "smollm2-135m" in err and "llama-3.2-1b" in err  # every family's names
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


def test_a_negative_grad_clip_is_refused_and_zero_means_none(tmp_path, capsys):
    # clip_grad_norm_ with a negative bound flips every gradient: the loss would climb
    assert main(["pretrain", *TINY_RUN, "--grad-clip", "-1", "--out-dir", str(tmp_path)]) == 2
    assert "--grad-clip must be 0 or more" in capsys.readouterr().err
    assert "(0: no clipping)" in next(a.help for a in actions(build_parser(), "pretrain") if a.dest == "grad_clip")


@pytest.mark.parametrize("seed", ["18446744073709551616", "-9223372036854775809", "1.5"])
def test_a_seed_beyond_64_bits_is_a_flag_error(capsys, seed):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--preset", "tiny", "--prompt", "Hi", "--seed", seed])
    assert stop.value.code == 2 and "--seed: a seed must be a whole number" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--temperature", "1e-40"), ("--top-p", "1e-50")])
def test_sampling_settings_that_underflow_generate(capsys, option, value):
    assert main(["generate", "--preset", "tiny", "--prompt", "Hi", "--max-new-tokens", "3", "--device", "cpu",
                 "--temperature", "0.7", option, value]) == 0


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


def test_ctrl_c_in_the_final_evaluation_names_the_resume_command(tmp_path, capsys, monkeypatch):
    from minigpt.jobs import pretrain as pretrain_job

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    whole_split_loss = pretrain_job._whole_split_loss
    monkeypatch.setattr(pretrain_job, "_whole_split_loss", ctrl_c)
    assert main(["pretrain", *TINY_RUN, "--out-dir", str(tmp_path), "--name", "run"]) == 130
    err = capsys.readouterr().err
    assert f"stopped after step 2; the checkpoint is saved in {tmp_path / 'run'}. Continue with: minigpt pretrain " \
           f"--resume {tmp_path / 'run'} --device cpu" in err
    assert (tmp_path / "run" / "samples.txt").is_file()
    monkeypatch.setattr(pretrain_job, "_whole_split_loss", whole_split_loss)
    assert main(["pretrain", "--resume", str(tmp_path / "run")]) == 0  # only the final evaluation is left
    assert "validation loss" in capsys.readouterr().out


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


@pytest.mark.parametrize("task", ["instruct", "dpo"])
@pytest.mark.parametrize("content, words", [
    (b"[" * 100_000, "nests JSON lists or objects too deeply"), ('[{"instruction": "caf\u00e9"}]'.encode("latin-1"),
                                                               "is not UTF-8 text: byte 21 (line 1)")])
def test_data_files_that_cannot_be_read_are_named_on_one_line(tmp_path, capsys, task, content, words):
    data = tmp_path / "data.json"
    data.write_bytes(content)
    assert main(["finetune", task, "--model", "tiny", "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{data} " in err and words in err and err.count("\n") == 1


@pytest.mark.parametrize("task, settings", [("classify", "minigpt.jobs.classify.ClassifyConfig"),
                                            ("instruct", "minigpt.jobs.instruct.InstructConfig"),
                                            ("dpo", "minigpt.jobs.dpo.DPOConfig"),
                                            ("grpo", "minigpt.jobs.grpo.GRPOConfig")])
def test_finetune_settings_cover_every_option(task, settings):
    module, name = settings.rsplit(".", 1)
    flags = {a.dest for a in actions(build_parser(), "finetune", task)}
    assert flags == {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
