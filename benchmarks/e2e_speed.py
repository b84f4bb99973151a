"""End-to-end generation speed of SmolLM2-135M-Instruct on the CPU: prefill and decode tokens/s of the
fp32 model and of 4-bit RTN (groups of 64), through transformers' ``generate`` (what ``matpress generate``
ran before) and through matpress's lean decode loop (``matpress.decode``, what it runs now), all in one
run, timed in turn within each repeat (medians).

    python benchmarks/e2e_speed.py --out benchmarks/results/e2e_speed.md
"""

from __future__ import annotations

import argparse
import copy
from typing import Callable, Optional

import torch

import matpress
from matpress.decode import decoder
from matpress.evaluation.timing import command_line, interleaved_medians, machine_description, publish
from matpress.kernels.build import kernel_path
from matpress.models import SMOLLM2, load_pretrained

INT4 = {"method": "rtn", "bits": 4, "group_size": 64}
RECIPES = {
    "int4 g64 (embedding, LM head fp32)": {"default": INT4},
    "int4 g64, tied embedding / LM head int4 g64 too": {"default": INT4, "rules": [{"pattern": "*embed_tokens", **INT4}]},
}


def hf_generate(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> Callable[[], object]:
    """transformers' greedy generate of exactly ``new`` tokens (the old ``matpress generate``)."""
    return lambda: model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


def lean(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> Callable[[], object]:
    """matpress's decode loop: prefill, then ``new - 1`` more greedy steps."""

    def run() -> None:
        step = decoder(model, prompt.shape[1] + new)
        token = step(prompt).argmax().view(1, 1)
        for _ in range(new - 1):
            token = step(token).argmax().view(1, 1)

    return run


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 512], help="prompt lengths to prefill")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded after the shortest prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the markdown here")
    args = parser.parse_args(argv)
    dense = load_pretrained(SMOLLM2).model
    models = {"fp32": dense}
    for name, recipe in RECIPES.items():
        models[name] = copy.deepcopy(dense)
        matpress.compress(models[name], recipe, progress=False)
    generator = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(0, dense.config.vocab_size, (1, n), generator=generator) for n in args.prompts}
    short = prompts[min(args.prompts)]
    contenders: dict[tuple[str, str, str], Callable[[], object]] = {}
    for model_name, model in models.items():
        for path, make in (("transformers generate", hf_generate), ("matpress lean loop", lean)):
            for n, prompt in prompts.items():
                contenders[(model_name, path, f"prefill {n}")] = make(model, prompt, 1)
            contenders[(model_name, path, "decode")] = make(model, short, args.new_tokens + 1)
    with torch.inference_mode():
        seconds = interleaved_medians(contenders, repeats=args.repeats)
    lines = [
        "# End-to-end generation speed: SmolLM2-135M-Instruct",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}  ",
        f"Compressed matmuls: {kernel_path()} (PyTorch custom operators)",
        "",
        f"Tokens/s, medians of {args.repeats} repeats timed in turn after one warm-up. Prefill: one forward "
        f"over a random prompt and the first token; decode: the {args.new_tokens} tokens after the "
        f"{min(args.prompts)}-token prompt (their time less the prefill's). Greedy.",
        "",
        "| model | path | " + " | ".join(f"prefill {n}" for n in args.prompts) + " | decode |",
        "|---|---|" + "---:|" * (len(args.prompts) + 1),
    ]
    for model_name in models:
        for path in ("transformers generate", "matpress lean loop"):
            prefill = {n: n / seconds[(model_name, path, f"prefill {n}")] for n in args.prompts}
            shortest = seconds[(model_name, path, f"prefill {min(args.prompts)}")]
            decode = args.new_tokens / (seconds[(model_name, path, "decode")] - shortest)
            lines.append(f"| {model_name} | {path} | " + " | ".join(f"{v:.1f}" for v in prefill.values()) + f" | {decode:.1f} |")
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
