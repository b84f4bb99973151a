"""The ``matpress`` command line: compress, eval, generate, bench, info, report, export."""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn, Optional, Sequence, Union

import torch

import matpress
from matpress.decode import Sampling, generate, measure_speed
from matpress.errors import BudgetError, MatpressError, RecipeError, RemoteCodeError, quote
from matpress.evaluation.text import chat_text, has_chat_template
from matpress.evaluation.timing import machine_description
from matpress.export import TARGETS
from matpress.formats.codebook import TABLES
from matpress.formats.kquant import KQUANTS
from matpress.io import MAX_SHARD_BYTES, check_output_location, load_tokenizer, read_checkpoint, stored_nbytes
from matpress.kernels.build import kernel_path
from matpress.methods import METHODS
from matpress.methods.obs import AUTO
from matpress.models import load_pretrained
from matpress.nn.layout import CAUSAL_LM, model_kind
from matpress.passes.budget import SENSITIVITY, save_allocation
from matpress.recipe import PRESETS, Budget, Recipe
from matpress.report import write_report


PER_CHANNEL = "channel"
TRUST_HELP = "let transformers run the Python code a model or tokenizer directory ships (auto_map); off by default: such a directory is refused"
EXPECT_DIGEST_HELP = "refuse the checkpoint unless its digest (printed by 'matpress info') is this one"


def _group(value: str):
    if value == PER_CHANNEL:
        return PER_CHANNEL
    try:
        g = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--group takes a positive integer or 'channel', got {quote(value)}") from None
    if g <= 0:
        raise argparse.ArgumentTypeError(f"--group takes a positive integer or 'channel', got {quote(value)}")
    return g


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"takes a positive integer, got {quote(value)}")
    return n


def _size(value: str) -> int:
    """A size in bytes written as a budget is ('2GB', '500MB', '1GiB')."""
    try:
        nbytes = Budget.parse(value).nbytes
    except BudgetError:
        nbytes = None
    if nbytes is None:
        raise argparse.ArgumentTypeError(f"takes a size such as '2GiB', '500MB' or '1GB', got {quote(value)}")
    return nbytes


class OneLineParser(argparse.ArgumentParser):
    """Bad flags end as every refused input does: exit 2 and one line on stderr (usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _recipe_from_args(args: argparse.Namespace):

    data = {}
    if args.recipe:
        recipe = Recipe.load(args.recipe)
        data = recipe.to_dict()
    default = data.setdefault("default", {})
    given = [f"--{k.replace('_', '-')}" for k in ("method", "bits", "group", "symmetric", "kquant", "act_order", "rotate", "asymmetric", "table") if getattr(args, k) is not None]
    if args.budget is not None and given:
        raise RecipeError(
            f"{', '.join(given)} describe one rule for every layer, but --budget chooses each layer's format "
            "from --candidates; drop them, or pin layers with rules in a --recipe file"
        )
    # the flags are shorthands for the default rule and override the recipe file's default
    if args.method is not None and args.method != default.get("method"):
        default.clear()
        default["method"] = args.method
    flags = (
        ("bits", args.bits), ("group_size", args.group), ("symmetric", args.symmetric), ("kquant", args.kquant),
        ("act_order", args.act_order), ("rotate", args.rotate), ("asymmetric", args.asymmetric), ("table", args.table),
    )
    for key, value in flags:
        if value is not None:
            default[key] = None if value == PER_CHANNEL else value
    calibration = {
        key: value
        for key, value in (("text", args.calib), ("samples", args.samples), ("seq_len", args.seq_len), ("batch_size", args.batch_size))
        if value is not None
    }
    if calibration:
        data["calibration"] = {**data.get("calibration", {}), **calibration}
    if args.exclude is not None:
        data["exclude"] = args.exclude
    if args.budget is not None:
        data["budget"] = args.budget
    if args.candidates is not None:
        data["candidates"] = args.candidates
    return Recipe.from_dict(data, source=args.recipe or "command line")


def cmd_compress(args: argparse.Namespace) -> None:
    check_output_location(args.out, args.force)  # fail now, not after the compression
    recipe = _recipe_from_args(args)
    loaded = load_pretrained(args.model, args.trust_remote_code, stream=True)
    report = matpress.compress(loaded.model, recipe, progress=not args.quiet, tokenizer=loaded.tokenizer)
    allocation = report.allocation
    out = matpress.save(
        loaded.model, args.out, tokenizer=loaded.tokenizer, recipe=recipe, source=loaded.source, force=args.force,
        extra_files=None if allocation is None else lambda staging: save_allocation(staging / SENSITIVITY, allocation),
        max_shard_bytes=args.max_shard_size, progress=not args.quiet,
    )
    print(report.table())
    print(f"\nsaved to {out}")


def cmd_info(args: argparse.Namespace) -> None:

    checkpoint = read_checkpoint(args.dir, args.expect_digest)
    manifest = checkpoint.manifest
    base = manifest["base_model"]
    print(f"checkpoint: {args.dir}")
    print(f"checkpoint digest: sha256:{checkpoint.digest}")
    print(f"base model: {base.get('class')} from {base.get('source')}")
    if manifest.get("recipe"):
        print(f"recipe: {json.dumps(manifest['recipe'])}")
    print("\n| layer | shape | format | bits/weight | KiB |\n|---|---|---|---|---|")
    total_bytes = total_weights = 0
    for name, entry in manifest["layers"].items():
        nbytes = stored_nbytes(entry)
        n = entry["shape"][0] * entry["shape"][1]
        total_bytes += nbytes
        total_weights += n
        desc = entry.get("description", entry["format"])
        print(f"| {name} | {entry['shape'][0]}x{entry['shape'][1]} | {desc} | {8 * nbytes / n:.3f} | {nbytes / 1024:.1f} |")
    if total_weights:
        print(
            f"| **total** ({len(manifest['layers'])} layers) | | | {8 * total_bytes / total_weights:.3f} "
            f"| {total_bytes / 1024:.1f} ({100 * total_bytes / (4 * total_weights):.1f}% of fp32) |"
        )


def cmd_eval(args: argparse.Namespace) -> None:

    checkpoint = read_checkpoint(args.dir, args.expect_digest)
    manifest = checkpoint.manifest
    model = matpress.load(args.dir, expect_digest=checkpoint.digest)
    tokenizer = load_tokenizer(args.dir, args.trust_remote_code)
    source = args.reference or manifest["base_model"].get("source")
    reference = None
    if source:
        try:
            reference = load_pretrained(source, args.trust_remote_code).model
        except RemoteCodeError:
            raise  # a refusal to run code is not a missing original: the user must decide
        except MatpressError as e:
            print(f"note: the original model could not be loaded ({e}); comparing without it", file=sys.stderr)
    result = matpress.evaluate(
        model, tokenizer, reference=reference, text_file=args.text, n_sentences=args.sentences, progress=not args.quiet
    )
    for key, value in result.items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")


def load_causal_lm(args: argparse.Namespace, command: str) -> torch.nn.Module:
    """The causal LM of checkpoint ``args.dir``; a one-line error for any other model."""
    checkpoint = read_checkpoint(args.dir, args.expect_digest)
    model = matpress.load(args.dir, expect_digest=checkpoint.digest)
    if model_kind(model) != CAUSAL_LM:
        raise MatpressError(
            f"{args.dir} holds a {type(model).__name__}, which does not write text; {command} needs a causal LM "
            "checkpoint ('matpress eval' measures encoders)"
        )
    return model


def cmd_generate(args: argparse.Namespace) -> None:
    model = load_causal_lm(args, "generate")
    tokenizer = load_tokenizer(args.dir, args.trust_remote_code)
    if tokenizer is None:
        raise MatpressError(f"{args.dir} holds no tokenizer, so the prompt cannot be encoded; compress the model again with its tokenizer")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    templated = has_chat_template(tokenizer) and not args.no_chat_template
    prompt = chat_text(tokenizer, [{"role": "user", "content": args.prompt}], generation_prompt=True) if templated else args.prompt
    # a chat template writes its special tokens itself
    ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
    tokens: list[int] = []
    printed = ""
    for token in generate(model, ids, args.max_new_tokens, sampling, stop=tokenizer.eos_token_id):
        tokens.append(token)
        # stream: print what decoding the answer so far adds (a token can change how the last one reads)
        text = tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
        if text.startswith(printed):
            print(text[len(printed):], end="", flush=True)
            printed = text
    print()


def cmd_bench(args: argparse.Namespace) -> None:
    model = load_causal_lm(args, "bench")
    speed = measure_speed(model, args.prompt_tokens, args.new_tokens, args.repeats)
    print(f"machine: {machine_description()}")
    print(f"matmuls: {kernel_path()}")
    print(f"decode path: {speed.path}")
    print(f"prefill ({speed.prompt_tokens} tokens): {speed.prefill_tokens_per_s:.1f} tokens/s")
    print(f"decode ({speed.new_tokens} tokens after the prompt): {speed.decode_tokens_per_s:.1f} tokens/s")
    print(f"peak memory (resident, whole process): {speed.peak_rss_mb:.0f} MB")


def cmd_report(args: argparse.Namespace) -> None:

    path = write_report(args.dir, args.out)
    print(f"report written to {path}")


def cmd_export(args: argparse.Namespace) -> None:
    options = {"force": args.force, "expect_digest": args.expect_digest}
    if args.allow_requantize:
        options["allow_requantize"] = True
    report = matpress.export(args.dir, args.out, to=args.to, **options)
    print(report.table())


def strength(text: str) -> Union[float, str]:
    """``--asymmetric``'s value: ``auto`` or a number (its range is the method's to check)."""
    if text == AUTO:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a number from 0 to 1 or {AUTO!r}, not {text!r}") from None


def build_parser() -> argparse.ArgumentParser:

    parser = OneLineParser(prog="matpress", description="Compress the linear layers of a model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a model and save it", description="Compress MODEL's linear layers and save the result.")
    p.add_argument("model", help="a local Hugging Face model directory, a GGUF file of a causal LM (dequantized once into matpress's cache; needs gguf and accelerate), 'minilm' for the embedded all-MiniLM-L6-v2, or 'smollm2' for the embedded SmolLM2-135M-Instruct (see `make smollm2`)")
    p.add_argument("--out", required=True, help="directory to write the compressed checkpoint to")
    p.add_argument("--recipe", help="YAML/JSON recipe file; the flags below override its default rule")
    p.add_argument("--method", choices=sorted(METHODS), help="method of the default rule (default: rtn)")
    p.add_argument("--bits", type=int, help="bits per weight of the default rule (2-8)")
    p.add_argument("--group", type=_group, help="input columns per scale, or 'channel' for one scale per output channel")
    p.add_argument("--symmetric", action="store_true", default=None, help="symmetric quantization (no zero points)")
    p.add_argument("--kquant", choices=sorted(KQUANTS), help="rtn, gptq: codes on the exact grid of this GGUF K-quant (exported bit for bit; --bits, --group, --symmetric unused); layers whose rows are not a multiple of 256 get the legacy type llama.cpp falls back to")
    p.add_argument("--act-order", action="store_true", default=None, help="gptq: quantize columns in order of decreasing activation energy")
    p.add_argument("--rotate", action="store_true", default=None, help="gptq: randomized Hadamard rotation of each layer's inputs")
    p.add_argument("--asymmetric", type=strength, metavar="STRENGTH", help="gptq, gptq_codebook: move each weight STRENGTH (0 to 1) of the way toward the target that also undoes the error earlier compressed layers left in its input (GPTAQ), or 'auto': per layer, the strength that does best on held-out calibration batches; the calibration runs through the uncompressed model as well (one more forward per block)")
    p.add_argument("--table", choices=TABLES, help="codebook, gptq_codebook: the table of levels: nf, nl or iq4nl (fixed; iq4nl: llama.cpp's IQ4_NL levels, 4 bits), layer or row (learned per layer or per output channel)")
    p.add_argument("--calib", help="calibration text for calibrated methods (gptq, awq, sparsegpt, wanda, svd_llm, eora, ...) and budgets: 'builtin' (default; the calibration split of pydoc_data.topics), a text file, or a .jsonl file with a 'text' or 'messages' field a line; formatted with the tokenizer's chat template when it has one")
    p.add_argument("--samples", type=int, help="calibration samples: sentences for encoders, token windows for causal LMs (default 128)")
    p.add_argument("--seq-len", type=int, help="tokens per calibration window / longest calibration sentence (default 128)")
    p.add_argument("--batch-size", type=int, help="calibration samples per forward pass (default 8)")
    p.add_argument("--exclude", nargs="*", help="layer-name patterns to leave dense (default: *lm_head *embed*)")
    p.add_argument("--budget", help="choose each layer's format automatically within a size: '3.2bpw', '40MB', '12MiB'")
    p.add_argument("--candidates", choices=sorted(PRESETS), help="candidate set for --budget (default: quant): quant = mixed integer bits and groups; quant-fast = 2/3/4/8 bits, groups of 128 (a quarter of the encodings); quant+lowrank adds int + low-rank (EoRA) pairs; quant+codebook adds 2-4 bit codebooks (nl table, groups of 32 and 64); gguf = every GGUF block type that `export --to gguf` writes exactly (Q4_0..Q8_0, Q2_K..Q6_K, IQ4_NL, F16; no rotation); all adds codebooks, sparse, ternary, low-rank and Monarch")
    p.add_argument("--force", action="store_true", help="replace --out even if it is a non-empty directory that is not a matpress checkpoint (its contents are deleted)")
    p.add_argument("--max-shard-size", type=_size, default=MAX_SHARD_BYTES, metavar="SIZE", help="write checkpoints bigger than this as shards with an index: '2GiB' (default), '500MB', '1GB'")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="measure a compressed checkpoint against its original", description="Evaluate a compressed checkpoint on held-out text.")
    p.add_argument("dir", help="checkpoint directory written by 'matpress compress'")
    p.add_argument("--reference", help="original model (default: the source recorded in the checkpoint)")
    p.add_argument("--text", help="text file to evaluate on (default: built-in pydoc_data.topics, evaluation split)")
    p.add_argument("--sentences", type=_positive_int, default=600, help="sentences for encoder evaluation (default 600)")
    p.add_argument("--expect-digest", help=EXPECT_DIGEST_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="answer a prompt with a compressed causal LM", description="Decode an answer to PROMPT with a compressed causal LM checkpoint (greedy unless --temperature), streaming the text.")
    p.add_argument("dir", help="checkpoint directory written by 'matpress compress'")
    p.add_argument("--prompt", required=True, help="the user's message; formatted with the tokenizer's chat template when it has one")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sample from softmax(logits / T) (default 0: greedy)")
    p.add_argument("--top-k", type=_positive_int, help="sample among the K most likely tokens only (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--no-chat-template", action="store_true", help="continue PROMPT as plain text instead of answering it as a chat message")
    p.add_argument("--expect-digest", help=EXPECT_DIGEST_HELP)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="prefill and decode speed of a compressed causal LM", description="Measure prefill and decode tokens/s and peak memory of a compressed causal LM checkpoint (random prompt ids, greedy decoding, medians of repeats).")
    p.add_argument("dir", help="checkpoint directory written by 'matpress compress'")
    p.add_argument("--prompt-tokens", type=_positive_int, default=128, help="tokens of the prefilled prompt (default 128)")
    p.add_argument("--new-tokens", type=_positive_int, default=64, help="tokens decoded after it (default 64)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed repeats after one warm-up (default 3)")
    p.add_argument("--expect-digest", help=EXPECT_DIGEST_HELP)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="per-layer table of a compressed checkpoint", description="Show a checkpoint's per-layer formats and sizes.")
    p.add_argument("dir", help="checkpoint directory")
    p.add_argument("--expect-digest", help=EXPECT_DIGEST_HELP)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("report", help="write a Markdown report with plots", description="Write report.md and PNG plots for a checkpoint.")
    p.add_argument("dir", help="checkpoint directory")
    p.add_argument("--out", help="directory for report.md and the plots (default: the checkpoint directory)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write a checkpoint in a format other runtimes load (GGUF, compressed-tensors)", description="Export a compressed checkpoint to OUT in the format --to.")
    p.add_argument("dir", help="checkpoint directory written by 'matpress compress'")
    p.add_argument("out", help="file (gguf: model.gguf) or directory (compressed-tensors) to write")
    p.add_argument("--to", required=True, choices=sorted(TARGETS), help="gguf: one GGUF file for llama.cpp / ollama (Llama-family causal LMs); compressed-tensors: a pack-quantized directory for vLLM / transformers")
    p.add_argument("--allow-requantize", action="store_true", help="gguf: decode and re-quantize layers whose format has no exact counterpart (the added error is reported per tensor) instead of refusing them")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (a directory's contents are deleted)")
    p.add_argument("--expect-digest", help=EXPECT_DIGEST_HELP)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except MatpressError as e:
        print(f"matpress {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
