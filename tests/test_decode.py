"""The lean decode loop (matpress.decode) against the model's own forward, and ``matpress bench``."""

from __future__ import annotations

import pytest
import torch

import matpress
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from matpress.cli import main
from matpress.decode import LeanLlama, ModelStep, Sampling, decoder, generate, lean_supported, measure_speed
from matpress.errors import MatpressError

EPS = torch.finfo(torch.float32).eps
RTN = {"default": {"method": "rtn", "bits": 4, "group_size": 32}}


def full_forward_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1]


def assert_same_logits(a: torch.Tensor, b: torch.Tensor, model) -> None:
    # the same modules in the same order; attention sums the same terms in another order (static cache,
    # grouped heads not expanded), so each logit moves by fp32 roundings of the sums of at most
    # hidden + positions terms, each at most max|logit| in size
    terms = model.config.hidden_size + model.config.max_position_embeddings
    assert bool(((a - b).abs() <= terms * EPS * b.abs().max()).all())


CODEBOOK = {"default": {"method": "codebook", "bits": 4, "group_size": 32, "table": "iq4nl"}}


@pytest.mark.parametrize("recipe", [None, RTN, CODEBOOK], ids=["dense", "int4", "codebook4"])
def test_lean_loop_gives_the_logits_of_the_full_forward_at_every_step(recipe):
    model = tiny_llama()
    compressed = recipe is not None
    if compressed:
        matpress.compress(model, recipe, progress=False)
    assert lean_supported(model)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (9,)).tolist()
    step = LeanLlama(model, 16)
    # compressed: q, k, v as one kernel call and gate, up as another, and one token's step through every
    # block as one call of the decode plan; dense: each layer on its own
    assert all((p.layout is not None) == compressed for p in step.qkv + step.gate_up)
    assert (step.plan is not None) == compressed
    with torch.inference_mode():
        assert_same_logits(step(torch.tensor([ids])), full_forward_logits(model, ids), model)
        for token in (5, 77, 3):
            ids.append(token)
            assert_same_logits(step(torch.tensor([[token]])), full_forward_logits(model, ids), model)
        # a second prefill of several tokens after the cache holds some: the causal mask is offset
        ids += [1, 2, 3]
        assert_same_logits(step(torch.tensor([[1, 2, 3]])), full_forward_logits(model, ids), model)


def test_prefill_attention_in_chunks_gives_the_full_forwards_logits(monkeypatch):
    """Chunks of 4 queries: a first prefill of 10 tokens (chunks of 4, 4, 2) and a second of 6 after
    the cache holds some (each chunk's mask offset by the cached positions)."""
    import matpress.decode as decode

    monkeypatch.setattr(decode, "ATTENTION_CHUNK", 4)
    model = tiny_llama()
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (10,)).tolist()
    step = LeanLlama(model, 32)
    with torch.inference_mode():
        assert_same_logits(step(torch.tensor([ids])), full_forward_logits(model, ids), model)
        more = [7, 1, 99, 42, 5, 64]
        assert_same_logits(step(torch.tensor([more])), full_forward_logits(model, ids + more), model)


def test_a_block_shared_among_threads_gives_one_threads_logits():
    """Wide enough (over the 64 KiB of codes per block below which the decode plan stays on one thread)
    that each projection's tiles are split between two threads: every output is still computed by the
    same arithmetic, so two threads give one thread's logits exactly, and those of the full forward."""
    model = tiny_llama(layers=1, hidden=192)
    matpress.compress(model, RTN, progress=False)
    ids = [4, 8, 15, 16]
    threads = torch.get_num_threads()
    logits = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            step = LeanLlama(model, 8)
            projections = (step.qkv[0], step.o[0], step.gate_up[0], step.down[0])
            assert sum(p.layout.codes.numel() for p in projections) > 64 * 1024
            with torch.inference_mode():
                step(torch.tensor([ids[:-1]]))
                logits.append(step(torch.tensor([ids[-1:]])))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(logits[0], logits[1])
    assert_same_logits(logits[1], full_forward_logits(model, ids), model)


def test_a_block_the_decode_plan_does_not_know_runs_through_its_modules():
    """GELU instead of SiLU: no one-call block step; the modules' own step gives the full forward's logits."""
    model = tiny_llama()
    model.config.hidden_act = "gelu"
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    matpress.compress(model, RTN, progress=False)
    step = LeanLlama(model, 8)
    assert step.plan is None and step.qkv[0].layout is not None
    with torch.inference_mode():
        step(torch.tensor([[3, 9, 27]]))
        assert_same_logits(step(torch.tensor([[81]])), full_forward_logits(model, [3, 9, 27, 81]), model)


def test_the_decode_plan_refuses_bad_input():
    from matpress.kernels import lowbit

    model = tiny_llama()
    matpress.compress(model, RTN, progress=False)
    step = LeanLlama(model, 4)
    h, cos, sin = torch.zeros(model.config.hidden_size), torch.ones(step.head_dim), torch.zeros(step.head_dim)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="position 4 is outside the cache of 4 positions"):
        step.plan.step(h, cos, sin, 4)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="h must be a contiguous fp32 CPU vector of 64"):
        step.plan.step(h.double(), cos, sin, 0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="cos must be a contiguous fp32 CPU vector of 16"):
        step.plan.step(h, cos[:8], sin, 0)
    layer = model.model.layers[0]
    layouts = (step.qkv[0].layout, step.o[0].layout, step.gate_up[0].layout, step.down[0].layout)
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    keys = step.keys[0][0]
    for bad, match in [
        (lowbit.LlamaBlock(layouts, norms, keys, keys[:, :2]), "block 0's caches must be contiguous fp32 CPU tensors"),
        (lowbit.LlamaBlock(layouts, norms, keys, keys.double()), "block 0's caches must be contiguous fp32 CPU tensors"),
        (lowbit.LlamaBlock(layouts, (norms[0], norms[1][:8]), keys, keys), "norm weights must be contiguous fp32 CPU vectors of 64"),
        (lowbit.LlamaBlock(layouts[::-1], norms, keys, keys), "block 0's projection 0 is 64x\\d+, the block needs 128x64"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            lowbit.decode_plan([bad], 1e-6, step.heads, step.scaling)


def test_greedy_generation_equals_transformers_generate():
    model = tiny_llama()
    matpress.compress(model, RTN, progress=False)
    ids = [4, 8, 15, 16, 23, 42]
    with torch.inference_mode():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids):].tolist()
    assert list(generate(model, ids, 10)) == expected


def test_other_causal_lms_decode_through_their_own_forward():
    model = tiny_gpt2()
    assert not lean_supported(model) and isinstance(decoder(model, 8), ModelStep)
    ids = [1, 2, 3]
    with torch.inference_mode():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 3:].tolist()
    # no stop token: transformers' generate has no eos to stop at either
    assert list(generate(model, ids, 5, stop=None)) == expected


def test_generation_stops_at_the_stop_token():
    model = tiny_llama()
    ids = [4, 8, 15]
    first = next(generate(model, ids, 5))
    assert list(generate(model, ids, 5, stop=first)) == [first]


def test_sampling_is_seeded_and_keeps_to_the_top_k():
    model = tiny_llama()
    ids = [4, 8, 15]
    sampled = list(generate(model, ids, 12, Sampling(temperature=1.5, top_k=3, seed=7)))
    assert sampled == list(generate(model, ids, 12, Sampling(temperature=1.5, top_k=3, seed=7)))
    assert sampled != list(generate(model, ids, 12))  # greedy, with 12 draws among 3, almost never the same
    # every sampled token is among the 3 most likely after what came before it
    seen = list(ids)
    for token in sampled:
        assert token in full_forward_logits(model, seen).topk(3).indices.tolist()
        seen.append(token)


@pytest.mark.parametrize("bad, match", [({"temperature": -1.0}, "negative"), ({"top_k": 0}, "keeps no token")])
def test_bad_sampling_settings_are_refused(bad, match):
    with pytest.raises(MatpressError, match=match):
        Sampling(**bad)


def test_cache_overflow_says_what_to_do():
    step = LeanLlama(tiny_llama(), 4)
    with pytest.raises(MatpressError, match="holds 4 tokens and 5 were asked for"):
        step(torch.zeros(1, 5, dtype=torch.long))


def test_measure_speed_reports_positive_rates():
    speed = measure_speed(tiny_llama(), prompt_tokens=8, new_tokens=4, repeats=1)
    assert speed.path.startswith("lean") and speed.prefill_tokens_per_s > 0 and speed.decode_tokens_per_s > 0
    assert speed.peak_rss_mb > 0


def test_bench_cli_prints_prefill_decode_and_memory(tmp_path, capsys):
    model = tiny_llama()
    matpress.compress(model, RTN, progress=False)
    directory = matpress.save(model, tmp_path / "ckpt")
    assert main(["bench", str(directory), "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for expected in ("prefill (8 tokens):", "decode (4 tokens after the prompt):", "peak memory", "lean Llama loop"):
        assert expected in out


def test_bench_cli_refuses_an_encoder_in_one_line(minilm, tmp_path, capsys):
    model = tiny_bert(vocab=minilm.tokenizer.vocab_size)
    matpress.compress(model, RTN, progress=False)
    directory = matpress.save(model, tmp_path / "ckpt", tokenizer=minilm.tokenizer)
    capsys.readouterr()
    assert main(["bench", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bench needs a causal LM" in err
