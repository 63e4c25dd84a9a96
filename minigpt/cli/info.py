"""``minigpt info``: the model presets, their parameter counts and memory in each format;
``minigpt info --kernels``: the kernel measured fastest for each matrix product on this machine."""

from __future__ import annotations

import argparse

HELP = "list the model presets with parameter counts and memory (full precision and quantized)"


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    p.add_argument("--kernels", action="store_true",
                   help="print which kernel computes each matrix product here and the speeds measured "
                        "(gpt2-small's decoding products are measured first where missing)")


def _kernels() -> int:
    from minigpt.jobs.info import kernel_choices
    from minigpt.runtime.kernels import KERNEL_ENV, forced_kernel

    table = kernel_choices()
    machine = table.machine
    print(f"{machine['cpu']}; {machine['isa']}; torch {machine['torch']}; {machine['threads']} threads")
    print(f"table: {table.path} (delete it to measure again)")
    if forced_kernel():
        print(f"{KERNEL_ENV}={forced_kernel()} forces that kernel for every float product: the table is not used")
    print(f"{'product':<34} {'chosen':<16} speed of each kernel: GB/s of weights read, GFLOP/s")
    for product, seconds in table.rows():
        chosen = min(seconds, key=seconds.__getitem__)
        speeds = "  ".join(f"{kernel} {product.weight_bytes / s / 1e9:.1f} GB/s {product.flops / s / 1e9:.0f} GFLOP/s"
                           for kernel, s in seconds.items())
        print(f"{product.key:<34} {chosen:<16} {speeds}")
    print("Each product is timed once per machine (CPU model, instruction set, torch version, threads), rows "
          "rounded up to a power of two (timed at 256 at most); the faster kernel computes it from then on.")
    return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.2f}GB" if n >= 2**30 else f"{n / 2**20:.0f}MB"


def run(args: argparse.Namespace) -> int:
    if args.kernels:
        return _kernels()
    from minigpt.jobs.info import FORMATS, llama_sizes, preset_sizes

    header = (f"{'layers':>6} {'heads':>5} {'emb_dim':>7} {'context':>7} {'params':>15} {'tied head':>15}"
              + "".join(f" {name:>9}" for name in FORMATS))
    for family, sizes in (("preset", preset_sizes()), ("llama family", llama_sizes())):
        if family != "preset":
            print()
        print(f"{family:<22} {header}")
        for p in sizes:
            cfg = p.cfg
            print(f"{p.name:<22} {cfg.n_layers:>6} {cfg.n_heads:>5} {cfg.emb_dim:>7} {cfg.context_length:>7} "
                  f"{p.parameters:>15,} {p.tied_parameters:>15,}"
                  + "".join(f" {_size(p.memory[name]):>9}" for name in FORMATS))
    print("'params' is the preset as configured; 'tied head' shares the output head with the token embedding, "
          "as OpenAI's GPT-2 checkpoints do (the Llama family as published). Memory is the configured model's; "
          "--quantize stores the blocks' weight matrices in 8 or about 4 bits (int8, int4: the output head too, "
          "a tied head as its own copy beside the float32 embedding); the embeddings, the norms and the biases "
          "stay in float32, and so does the head under nf4 and nf4-dq.")
    return 0
