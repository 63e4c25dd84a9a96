"""The ``minigpt`` command line: one sub-command per job.

Each sub-command is a pair of functions: ``_add_<name>(subparsers)`` declares its
options and ``_cmd_<name>(args)`` runs it, calling the library the same way a
notebook would.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from minigpt.config import PRESETS, GPTConfig
from minigpt.download import ChecksumError


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="list the model presets with parameter counts and memory")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from minigpt.model import GPTModel

    print(f"{'preset':<12} {'layers':>6} {'heads':>5} {'emb_dim':>7} {'context':>7} "
          f"{'params':>15} {'tied head':>15} {'float32':>10} {'bfloat16':>10}")
    for name in PRESETS:
        cfg = GPTConfig.from_preset(name)
        with torch.device("meta"):  # counts parameters without allocating them
            n = GPTModel(cfg).num_parameters()
            tied = GPTModel(GPTConfig.from_preset(name, tie_weights=True)).num_parameters()
        print(f"{name:<12} {cfg.n_layers:>6} {cfg.n_heads:>5} {cfg.emb_dim:>7} {cfg.context_length:>7} "
              f"{n:>15,} {tied:>15,} {n * 4 / 2**30:>8.2f}GB {n * 2 / 2**30:>8.2f}GB")
    print("'params' is the preset as configured; 'tied head' shares the output head with the "
          "token embedding, as OpenAI's GPT-2 checkpoints do.")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="GPT-2 name (gpt2-small, ...) or a weights/run directory")
    source.add_argument("--checkpoint", help="a run directory written by 'minigpt pretrain'")
    source.add_argument("--preset", default=None, help="random weights of this preset (a demo)")
    p.add_argument("--prompt", default="Every effort moves you")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each step")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from minigpt.generation import stream_generate, text_to_token_ids
    from minigpt.model import GPTModel
    from minigpt.tokenizer import get_gpt2_tokenizer
    from minigpt.training import select_device

    torch.manual_seed(args.seed)
    source = args.model or args.checkpoint
    model = GPTModel.from_pretrained(source) if source else GPTModel(args.preset or "tiny")
    device = select_device(args.device)
    model.to(device).eval()
    tokenizer = get_gpt2_tokenizer()
    idx = text_to_token_ids(args.prompt, tokenizer).to(device)
    print(args.prompt, end="", flush=True)
    for token in stream_generate(model, idx, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache,
                                 eos_id=tokenizer.eot_token):
        print(tokenizer.decode(token[0].tolist()), end="", flush=True)
    print()
    return 0


def _add_download(sub: argparse._SubParsersAction) -> None:
    from minigpt.weights import GPT2_REPOS, WEIGHTS_DIR_ENV

    p = sub.add_parser("download", help="download OpenAI's GPT-2 weights, verified by SHA-256")
    p.add_argument("name", choices=list(GPT2_REPOS))
    p.add_argument("--weights-dir", default=None,
                   help=f"where to keep them (default: ${WEIGHTS_DIR_ENV} or ~/.cache/minigpt/weights)")
    p.set_defaults(func=_cmd_download)


def _cmd_download(args: argparse.Namespace) -> int:
    from minigpt.weights import download_gpt2

    directory = download_gpt2(args.name, args.weights_dir)
    print(f"{args.name} is in {directory}")
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    from minigpt.training import PRECISIONS

    p = sub.add_parser(
        "pretrain", help="pretrain a model on a corpus (default: the tiny preset on python-docs)",
        description="Pretrain a model into runs/<name>/: checkpoint, loss.png, lr.png, samples.txt. "
                    "Options left out take minigpt.training.PretrainConfig's defaults, or with "
                    "--resume the run's own settings. Under 'torchrun --nproc_per_node=N -m minigpt "
                    "pretrain' each process trains on its share of every batch.")
    data = p.add_argument_group("data and model")
    data.add_argument("--corpus", help="a corpus name (the-verdict, tiny-shakespeare, python-docs) or a text file")
    data.add_argument("--preset", choices=list(PRESETS), help="model size (default: tiny)")
    data.add_argument("--context-length", type=int, help="tokens per window (default: the preset's)")
    data.add_argument("--drop-rate", type=float, help="dropout (default: the preset's)")
    data.add_argument("--batch-size", type=int, help="windows per batch and process")
    data.add_argument("--seed", type=int, help="initial weights, data order and dropout")
    loop = p.add_argument_group("training loop")
    loop.add_argument("--steps", dest="max_steps", type=int, help="optimizer steps")
    loop.add_argument("--lr", type=float, help="peak learning rate")
    loop.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay")
    loop.add_argument("--warmup", dest="warmup_steps", type=int, help="steps of linear warm-up")
    loop.add_argument("--weight-decay", type=float)
    loop.add_argument("--grad-clip", type=float, help="largest gradient norm (0: no clipping)")
    loop.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    loop.add_argument("--eval-every", type=int, help="steps between evaluations, samples and checkpoints")
    loop.add_argument("--eval-iter", type=int, help="batches per evaluation")
    loop.add_argument("--precision", choices=PRECISIONS, help="auto: bfloat16 where the hardware has it")
    loop.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    loop.add_argument("--gradient-checkpointing", action="store_true", default=None,
                      help="recompute activations in backward: less memory, more time")
    loop.add_argument("--prompt", dest="sample_prompt", help="prompt of the samples")
    run = p.add_argument_group("run")
    run.add_argument("--out-dir", default="runs", help="parent of the run directory (default: runs)")
    run.add_argument("--name", help="run directory name (default: <corpus>-<preset>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its settings")
    run.add_argument("--overwrite", action="store_true", help="start afresh in an existing run directory")
    run.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    import dataclasses
    import os
    import time
    from pathlib import Path

    from minigpt.checkpoint import STATE_FILE, load_settings
    from minigpt.training import PretrainConfig, TrainConfig, perplexity, pretrain

    fields = {f.name for cls in (PretrainConfig, TrainConfig) for f in dataclasses.fields(cls)}
    changes = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.resume:
        run_dir = Path(args.resume)
        settings = PretrainConfig.from_dict(load_settings(run_dir)).replace(**changes)
    else:
        settings = PretrainConfig().replace(**changes)
        run_dir = Path(args.out_dir) / (args.name or f"{Path(settings.corpus).stem}-{settings.preset}")
        if (run_dir / STATE_FILE).exists() and not args.overwrite:
            raise ValueError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                             "or pick another --name, or start it afresh with --overwrite")
    start = time.perf_counter()
    try:
        history = pretrain(settings, run_dir, resume=bool(args.resume), device=args.device)
    except FloatingPointError as err:  # diverged: the message says what to try
        print(f"minigpt pretrain: error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0 and history.val_losses:
        val = history.val_losses[-1]
        print(f"done in {time.perf_counter() - start:.0f} s: {history.steps[-1]} steps, "
              f"{history.tokens_seen[-1]:,} tokens; validation loss {val:.3f}, perplexity {perplexity(val):.1f}")
        print(f"run directory: {run_dir}  (try: minigpt generate --checkpoint {run_dir})")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss and perplexity of a model on a corpus's validation split")
    p.add_argument("--checkpoint", required=True, help="a run directory, a weights directory or a GPT-2 name")
    p.add_argument("--corpus", help="corpus name or text file (default: the run's corpus)")
    p.add_argument("--whole", action="store_true", help="the whole corpus, not only its validation split")
    p.add_argument("--context-length", type=int, help="tokens per window (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, help="evaluate only the first batches")
    p.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from torch.utils.data import DataLoader

    from minigpt.checkpoint import SETTINGS_FILE, load_settings
    from minigpt.data import GPTDataset
    from minigpt.datasets import load_token_ids, split_text
    from minigpt.model import GPTModel
    from minigpt.tokenizer import get_gpt2_tokenizer
    from minigpt.training import PretrainConfig, calc_loss_loader, perplexity, select_device

    is_run = (Path(args.checkpoint) / SETTINGS_FILE).is_file()
    run = PretrainConfig.from_dict(load_settings(args.checkpoint)) if is_run else PretrainConfig()
    if args.corpus is None and not is_run:
        raise ValueError(f"--corpus is needed: {args.checkpoint} is not a run directory naming its corpus")
    corpus = args.corpus or run.corpus
    device = select_device(args.device)
    model = GPTModel.from_pretrained(args.checkpoint).to(device).eval()
    ids = load_token_ids(corpus, get_gpt2_tokenizer())
    if not args.whole:
        _, ids = split_text(ids, 1 - run.val_ratio)  # the part pretrain held out
    n = args.context_length or model.cfg.context_length
    loader = DataLoader(GPTDataset(ids, max_length=n, stride=n), batch_size=args.batch_size)
    loss = calc_loss_loader(loader, model, device, args.max_batches)
    part = "whole corpus" if args.whole else f"last {run.val_ratio:.0%}: the validation split"
    print(f"{corpus} ({part}, {len(loader.dataset)} windows of {n} tokens): "
          f"loss {loss:.4f}, perplexity {perplexity(loss):.2f}")
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    from minigpt.classification import DEFAULT_TRAINABLE

    p = sub.add_parser("finetune", help="fine-tune a GPT to classify texts or to follow instructions")
    tasks = p.add_subparsers(dest="task", required=True)
    c = tasks.add_parser("classify", help="train a text classifier (book ch. 6), e.g. a spam filter")
    _add_finetune_options(c, model="gpt2-small", epochs=5, output="runs/classifier")
    c.add_argument("--data", default="spam",
                   help="'spam' (the SMS Spam Collection) or a CSV/TSV file whose first row names the columns")
    c.add_argument("--text-column", default="text")
    c.add_argument("--label-column", default="label")
    c.add_argument("--no-balance", action="store_true",
                   help="keep the classes' sizes (default: undersample each to the smallest)")
    c.add_argument("--subset", type=int, default=None, help="use only this many (balanced) examples")
    c.add_argument("--max-length", type=int, default=None,
                   help="tokens kept per text (default: the model's context length)")
    c.add_argument("--trainable", nargs="+", default=list(DEFAULT_TRAINABLE),
                   help="modules to train (default: %(default)s), or 'all'")
    c.set_defaults(func=_cmd_finetune_classify)

    i = tasks.add_parser("instruct", help="instruction fine-tuning (book ch. 7) with answers and their scores")
    _add_finetune_options(i, model="gpt2-medium", epochs=2, output="runs/instruct")
    i.add_argument("--data", default=None,
                   help="a JSON list of {instruction, input, output} (default: the book's 1,100 entries)")
    i.add_argument("--subset", type=int, default=None, help="use only the first N entries")
    i.add_argument("--max-length", type=int, default=1024, help="longest training sequence in tokens")
    i.add_argument("--mask-instruction", action="store_true", help="score the loss on the responses only")
    i.add_argument("--max-new-tokens", type=int, default=256, help="longest answer")
    i.add_argument("--num-responses", type=int, default=None, help="answer only the first N test prompts")
    judge = i.add_mutually_exclusive_group()
    judge.add_argument("--judge-model", help="a model to rate the answers 0-100 (a name, directory or preset)")
    judge.add_argument("--judge-url", help="a chat endpoint to rate the answers: Ollama's "
                       "http://localhost:11434/api/chat or an OpenAI-compatible .../v1/chat/completions "
                       "(sends $OPENAI_API_KEY if set)")
    i.add_argument("--judge-name", default="llama3", help="the model name sent to --judge-url")
    i.set_defaults(func=_cmd_finetune_instruct)


def _add_finetune_options(p: argparse.ArgumentParser, model: str, epochs: int, output: str) -> None:
    p.add_argument("--model", default=model,
                   help="a GPT-2 name or a weights/run directory, or another preset (e.g. tiny) for "
                        "random weights (default: %(default)s)")
    p.add_argument("--output", default=output, help="directory for the results (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5,
                   help="constant learning rate (default: %(default)s, for pretrained weights; "
                        "random weights want about 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank instead")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling numerator (default: the rank)")
    p.add_argument("--eval-every", type=int, default=50, help="optimizer steps between evaluations")
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")


def _load_finetune_model(spec: str):
    """A GPT-2 name or a directory loads weights; another preset name gives random ones."""
    from pathlib import Path

    from minigpt.model import GPTModel
    from minigpt.weights import GPT2_REPOS

    if spec in GPT2_REPOS or Path(spec).exists():
        return GPTModel.from_pretrained(spec)
    if spec in PRESETS:
        return GPTModel(spec)
    raise ValueError(f"--model {spec!r} is neither a GPT-2 name ({', '.join(GPT2_REPOS)}), "
                     f"a directory, nor a preset ({', '.join(PRESETS)})")


def _cmd_finetune_classify(args: argparse.Namespace) -> int:
    from minigpt.classification import finetune_classifier

    torch.manual_seed(args.seed)  # a preset's random weights too
    metrics = finetune_classifier(
        _load_finetune_model(args.model), args.output, args.data,
        text_column=args.text_column, label_column=args.label_column, balance=not args.no_balance,
        subset=args.subset, max_length=args.max_length,
        trainable="all" if args.trainable == ["all"] else args.trainable,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        eval_every=args.eval_every, eval_iter=args.eval_iter, seed=args.seed, device=args.device,
    )
    before, after = metrics["accuracy_before"], metrics["accuracy"]
    print(f"accuracy: train {after['train']:.1%}, validation {after['val']:.1%}, test {after['test']:.1%} "
          f"(test before fine-tuning: {before['test']:.1%})")
    print(f"saved the classifier, loss.png, accuracy.png and metrics.json in {args.output}")
    return 0


def _cmd_finetune_instruct(args: argparse.Namespace) -> int:
    import os

    from minigpt.instruction import HTTPJudge, ModelJudge, finetune_instructions
    from minigpt.tokenizer import get_gpt2_tokenizer
    from minigpt.training import select_device

    torch.manual_seed(args.seed)
    model = _load_finetune_model(args.model)
    judge = None
    if args.judge_model:
        judge_model = _load_finetune_model(args.judge_model).to(select_device(args.device))
        judge = ModelJudge(judge_model, get_gpt2_tokenizer())
    elif args.judge_url:
        judge = HTTPJudge(args.judge_url, args.judge_name, api_key=os.environ.get("OPENAI_API_KEY"))
    else:
        print("no judge given (--judge-model or --judge-url): reporting the test loss and perplexity only")
    metrics = finetune_instructions(
        model, args.output, args.data, subset=args.subset, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        allowed_max_length=args.max_length, mask_instruction=args.mask_instruction,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, max_new_tokens=args.max_new_tokens,
        num_responses=args.num_responses, judge=judge, eval_every=args.eval_every,
        eval_iter=args.eval_iter, seed=args.seed, device=args.device,
    )
    print(f"test loss {metrics['test_loss']:.3f}, perplexity {metrics['test_perplexity']:,.1f}")
    if metrics["judge_score"] is not None:
        print(f"judge score {metrics['judge_score']:.1f} / 100 over {metrics['judged']} "
              f"of {metrics['responses']} responses")
    print(f"saved the model, loss.png, responses.json and metrics.json in {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_info, _add_generate, _add_download, _add_finetune, _add_pretrain, _add_eval):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ConnectionError, KeyError, ChecksumError) as err:
        # Bad input is the user's to fix: show the message, not a traceback.
        print(f"minigpt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
