"""Compressed embeddings, tied LM heads sharing their stored format, and the warning about big
weights left uncompressed."""

import copy
import warnings

import pytest
import torch
from safetensors import safe_open
from torch import nn

import matpress
from matpress.errors import RecipeError
from matpress.formats import FORMATS, DenseFormat, IntFormat, format_class
from matpress.io import TENSORS, read_checkpoint
from matpress.nn.layers import CompressedEmbedding, CompressedLinear, TiedLinear
from matpress.recipe import Recipe

from checkpoint_edits import edit_manifest
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from format_checks import assert_within_kernel_bound, exact_matmul

ROWS = torch.tensor([5, 0, 36, 5, 17, 0, 1])  # repeated and out of order, the last row (36) of 37


def embed_rule(bits: int, group_size=64, pattern: str = "*embed_tokens") -> dict:
    return {"pattern": pattern, "method": "rtn", "bits": bits, "group_size": group_size}


def tiny_llama_tied(**kw) -> nn.Module:
    model = tiny_llama(**kw)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def ids_for(vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, vocab, (2, 9), generator=gen)


def uncompressed_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "left uncompressed" in str(w.message)]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_decode_rows_equals_the_rows_of_decode_for_every_format(name):
    torch.manual_seed(0)
    shape = {"nm_sparse": (40, 48), "monarch": (40, 48), "blockdiag": (40, 48), "kquant": (37, 256), "vq": (37, 48)}.get(name, (37, 50))
    fmt = format_class(name).encode(torch.randn(*shape))
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(fmt.decode_rows(ROWS, dtype), fmt.decode(dtype)[ROWS])
    assert fmt.decode_rows(torch.tensor([], dtype=torch.int64)).shape == (0, shape[1])


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 16, False), (3, None, True), (8, 64, False), (2, 7, False)])
def test_int_decode_rows_slices_the_packed_rows_exactly(bits, group_size, symmetric):
    torch.manual_seed(1)
    fmt = IntFormat.encode(torch.randn(37, 50) * torch.rand(37, 1), bits=bits, group_size=group_size, symmetric=symmetric)
    assert torch.equal(fmt.decode_rows(ROWS), fmt.decode()[ROWS])
    dense = DenseFormat.encode(torch.randn(37, 50), dtype="bf16")
    assert torch.equal(dense.decode_rows(ROWS), dense.decode()[ROWS])


def test_compressed_embedding_looks_up_like_nn_embedding():
    torch.manual_seed(2)
    fmt = IntFormat.encode(torch.randn(37, 50), bits=4, group_size=16)
    emb = CompressedEmbedding(fmt)
    reference = nn.Embedding.from_pretrained(fmt.decode())
    ids = ROWS.reshape(1, -1).repeat(3, 1)
    assert torch.equal(emb(ids), reference(ids))
    assert torch.equal(emb(ids.int()), reference(ids))
    for bad in (torch.tensor([37]), torch.tensor([[0, -1]])):
        with pytest.raises(IndexError):
            reference(bad)
        with pytest.raises(IndexError, match="out of range"):
            emb(bad)
    with pytest.raises(TypeError, match="int64 or int32"):
        emb(torch.zeros(2))
    half = CompressedEmbedding(fmt).half()  # rows come out in the module's dtype; the storage keeps its own
    assert half(ids).dtype == torch.float16 and half.scales.dtype == torch.float16 and half.packed.dtype == torch.uint8
    assert torch.equal(half(ids), reference.half()(ids))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tied", [True, False])
def test_compressed_embedding_model_matches_the_decoded_weight(bits, tied, tmp_path):
    model = tiny_llama_tied() if tied else tiny_llama()
    reference = copy.deepcopy(model)
    ids = ids_for(model.config.vocab_size)
    recipe = {"default": {"method": "rtn", "bits": 4, "group_size": 32}, "rules": [embed_rule(bits)]}
    report = matpress.compress(model, recipe, progress=False)
    emb = model.model.embed_tokens
    assert isinstance(emb, CompressedEmbedding) and emb.fmt.describe() == f"int{bits} g64 asym"
    row = report.layers[0]
    assert (row.name, row.bits_per_weight, row.shared_with) == ("model.embed_tokens", emb.fmt.bits_per_weight, ("lm_head",) if tied else ())
    # the reference: the same linear layers (RTN is deterministic), the embedding weight replaced by decode()
    matpress.compress(reference, {"default": recipe["default"]}, progress=False)
    reference.model.embed_tokens.weight.data.copy_(emb.fmt.decode())  # a tied head reads it too
    if tied:
        assert isinstance(model.lm_head, TiedLinear) and model.lm_head.fmt is emb.fmt
    else:
        assert isinstance(model.lm_head, nn.Linear)
        assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    # with the kernels off every layer computes decode-then-matmul with the same fp32 operations in the
    # same order on both sides, and the row lookup is exact: no rounding difference at all
    with exact_matmul():
        assert torch.equal(logits(model, ids), logits(reference, ids))
    if tied:  # through the kernels, the head is within the kernels' tested bound of x @ decode().T
        seen = {}
        model.lm_head.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
        logits(model, ids)
        assert_within_kernel_bound(seen["y"], emb.fmt, seen["x"], 64)
    matpress.save(model, tmp_path / "ckpt")
    loaded = matpress.load(tmp_path / "ckpt")
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    stored = loaded.model.embed_tokens
    assert isinstance(stored, CompressedEmbedding)
    assert all(torch.equal(t, emb.fmt.to_tensors()[k]) for k, t in stored.fmt.to_tensors().items())
    assert isinstance(loaded.lm_head, TiedLinear) == tied and (not tied or loaded.lm_head.fmt is stored.fmt)


def tensor_bytes(directory) -> int:
    with safe_open(str(directory / TENSORS), "pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())


def test_a_tied_head_shares_the_one_stored_format(tmp_path):
    model = tiny_gpt2()
    fp32_embedding = copy.deepcopy(model)
    vocab, dim = model.transformer.wte.weight.shape
    report = matpress.compress(model, {"rules": [embed_rule(8, 16, "transformer.wte")]}, progress=False)
    matpress.compress(fp32_embedding, None, progress=False)
    fmt = model.transformer.wte.fmt
    assert model.lm_head.fmt is fmt and model.lm_head.weight_nbytes == 0
    assert not [k for k in model.state_dict() if k.startswith("lm_head.")]
    # counted once in the report: the embedding's row, none for the head
    assert [r.name for r in report.layers].count("lm_head") == 0
    assert report.nbytes == fmt.nbytes + sum(r.nbytes for r in report.layers[1:])
    matpress.save(model, tmp_path / "int8")
    matpress.save(fp32_embedding, tmp_path / "fp32")
    # the file shrinks by exactly the fp32 embedding less its int8 form: the head stores nothing
    assert tensor_bytes(tmp_path / "fp32") - tensor_bytes(tmp_path / "int8") == 4 * vocab * dim - fmt.nbytes
    entry = read_checkpoint(tmp_path / "int8").manifest["layers"]["transformer.wte"]
    assert entry["kind"] == "embedding" and entry["tied_heads"] == ["lm_head"]
    loaded = matpress.load(tmp_path / "int8")
    assert loaded.lm_head.fmt is loaded.transformer.wte.fmt
    ids = ids_for(vocab)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_padding_idx_is_kept_and_reloaded(tmp_path):
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(40, 32, padding_idx=3), nn.Linear(32, 8))

    model = make()
    matpress.compress(model, {"rules": [{"pattern": "0", "method": "rtn", "bits": 8, "group_size": 32}]}, progress=False)
    assert isinstance(model[0], CompressedEmbedding) and model[0].padding_idx == 3
    assert torch.equal(model[0](torch.tensor([3])), torch.zeros(1, 32))  # a zero row quantizes exactly
    matpress.save(model, tmp_path / "ckpt")
    loaded = matpress.load(tmp_path / "ckpt", model=make())
    assert loaded[0].padding_idx == 3
    ids = torch.tensor([[3, 0, 39]])
    assert torch.equal(loaded(ids), model(ids))


def test_the_sequential_pass_runs_on_a_model_with_a_compressed_embedding():
    from conftest import random_data

    model = tiny_llama_tied()
    recipe = {"default": {"method": "gptq", "bits": 4, "group_size": 32}, "rules": [embed_rule(8)]}
    report = matpress.compress(model, recipe, calibration=random_data(model.config.vocab_size), progress=False)
    assert report.layers[0].name == "model.embed_tokens" and isinstance(model.lm_head, TiedLinear)
    assert sum(isinstance(m, CompressedLinear) for m in model.modules()) == 2 * 7 + 1


def test_rules_name_embeddings_and_untied_heads_past_the_default_exclusion():
    recipe = Recipe.from_dict({"rules": [embed_rule(8), {"pattern": "lm_head", "bits": 8}]})
    assert recipe.rule_for("model.embed_tokens", use_default=False).params.bits == 8
    assert recipe.rule_for("lm_head").params.bits == 8
    assert Recipe().rule_for("model.embed_tokens", use_default=False) is None
    assert Recipe.from_dict({"exclude": []}).rule_for("transformer.wte", use_default=False) is None
    # exclude patterns the user adds win over rules
    explicit = Recipe.from_dict({"rules": [embed_rule(8)], "exclude": ["*embed_tokens"]})
    assert explicit.rule_for("model.embed_tokens", use_default=False) is None


def test_untied_head_is_an_ordinary_linear_layer_a_rule_addresses():
    model = tiny_llama()
    report = matpress.compress(model, {"rules": [{"pattern": "lm_head", "bits": 8, "group_size": 32}]}, progress=False)
    assert type(model.lm_head) is CompressedLinear and model.lm_head.fmt.bits == 8
    assert "lm_head" in [r.name for r in report.layers]
    assert type(model.model.embed_tokens) is nn.Embedding


def test_the_warning_lists_big_uncompressed_parameters():
    model = tiny_llama()
    with pytest.warns(UserWarning, match="left uncompressed") as record:
        matpress.compress(model, None, progress=False)
    message = uncompressed_warnings(record)
    assert len(message) == 1
    assert [w.filename for w in record if "left uncompressed" in str(w.message)] == [__file__]  # the caller's line
    # 128 x 64 each of about 96k weights: 8.5 %; the norms (64 each) stay far below 1 %
    assert "model.embed_tokens.weight 128x64 (8.5%)" in message[0] and "lm_head.weight 128x64 (8.5%)" in message[0]
    assert "norm" not in message[0]
    tied = tiny_gpt2()
    with pytest.warns(UserWarning, match="left uncompressed") as record:
        matpress.compress(tied, None, progress=False)
    assert "transformer.wte.weight = lm_head.weight 128x64" in uncompressed_warnings(record)[0]


def test_no_warning_when_everything_big_is_compressed():
    model = tiny_llama()
    recipe = {"rules": [embed_rule(8), {"pattern": "lm_head", "bits": 8}]}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        matpress.compress(model, recipe, progress=False)
    assert isinstance(model.model.embed_tokens, CompressedEmbedding) and type(model.lm_head) is CompressedLinear
    assert uncompressed_warnings(record) == []


class ScaledEmbedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


@pytest.mark.parametrize(
    "embedding,match",
    [
        (nn.Embedding(40, 32, max_norm=1.0), "max_norm=1.0 is not supported"),
        (nn.Embedding(40, 32, scale_grad_by_freq=True), "scale_grad_by_freq"),
        (nn.Embedding(40, 32, sparse=True), "sparse"),
        (ScaledEmbedding(40, 32), "ScaledEmbedding is not a plain nn.Embedding"),
    ],
)
def test_embedding_options_that_change_the_lookup_are_refused(embedding, match):
    model = nn.Sequential(embedding, nn.Linear(32, 8))
    with pytest.raises(RecipeError, match=match):
        matpress.compress(model, {"rules": [{"pattern": "0", "bits": 8}]}, progress=False)
    assert type(model[0]) is type(embedding)


@pytest.mark.parametrize(
    "model,recipe,match",
    [
        (tiny_llama, {"rules": [{**embed_rule(8), "method": "gptq"}]}, "needs calibration statistics of the layer's inputs"),
        (tiny_llama, {"rules": [embed_rule(8, pattern="*embed_tokenz")]}, r"rule '\*embed_tokenz' matches no layer"),
        (tiny_llama_tied, {"rules": [{"pattern": "lm_head", "bits": 8}]}, "tied to the embedding model.embed_tokens"),
    ],
)
def test_bad_embedding_recipes_fail_clearly_before_changing_the_model(model, recipe, match):
    model = model()
    with pytest.raises(RecipeError, match=match):
        matpress.compress(model, recipe, progress=False)
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear


def test_an_embedding_rule_under_a_budget_is_applied_outside_the_budget():
    model = tiny_llama_tied()
    report = matpress.compress(model, {"budget": "4bpw", "rules": [embed_rule(8)]}, progress=False)
    assert isinstance(model.model.embed_tokens, CompressedEmbedding) and isinstance(model.lm_head, TiedLinear)
    assert model.model.embed_tokens.fmt.bits == 8
    table = report.allocation.table
    assert not any("embed" in n or "lm_head" in n for n in table.layers)
    chosen = sum(table.nbytes[i][j] for i, j in enumerate(report.allocation.choice))
    assert chosen <= 4 * sum(table.n_weights) / 8


def test_every_embedding_rule_is_checked_before_any_embedding_changes():
    model = tiny_bert()
    rules = [
        {"pattern": "*word_embeddings", "method": "rtn", "bits": 8},
        {"pattern": "*position_embeddings", "method": "awq", "bits": 8},
    ]
    with pytest.raises(RecipeError, match="embedding embeddings.position_embeddings: method 'awq'"):
        matpress.compress(model, {"rules": rules}, progress=False)
    assert type(model.embeddings.word_embeddings) is nn.Embedding


def test_a_tampered_embedding_entry_is_refused(tmp_path):
    model = tiny_llama_tied()
    matpress.compress(model, {"rules": [embed_rule(8)]}, progress=False)
    for key, value, match in (("kind", "conv", r"kind must be one of \['embedding', 'linear'\], got 'conv'"),
                              ("tied_heads", ["model.norm"], "tied head model.norm"),
                              ("padding_idx", 500, "padding_idx is not a row of the 128-row embedding, got 500")):
        directory = matpress.save(model, tmp_path / "ckpt")
        # re-signed (the digests recomputed), so the edit reaches the checks behind them
        edit_manifest(directory, lambda m: m["layers"]["model.embed_tokens"].update({key: value}))
        with pytest.raises(matpress.CheckpointError, match=match):
            matpress.load(directory)
