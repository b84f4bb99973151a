"""transformers' from_pretrained (and pipeline) on matpress checkpoints, and save_pretrained back."""

import pytest
import torch
import transformers

import matpress
from matpress.errors import CheckpointError
from matpress.hf import config_class
from matpress.io import HF_CONFIG, TENSORS
from matpress.nn.layers import CompressedEmbedding, CompressedLinear, TiedLinear

from conftest import byte_level_tokenizer

RECIPE = {
    "default": {"method": "rtn", "bits": 4, "group_size": 32},
    "rules": [{"pattern": "*embed_tokens", "method": "rtn", "bits": 8, "group_size": 32}, {"pattern": "*down_proj", "method": "dense", "dtype": "fp16"}],
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama with a tied head, every kind of matpress layer it can take, saved with its tokenizer."""
    tokenizer = byte_level_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    matpress.compress(model, RECIPE, progress=False)
    directory = matpress.save(model, tmp_path_factory.mktemp("hf") / "ckpt", tokenizer=tokenizer)
    return model, directory


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


IDS = torch.tensor([[5, 17, 60, 3, 99, 250, 12, 7]])


def test_from_pretrained_returns_the_compressed_model_with_identical_logits(saved):
    model, directory = saved
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory)
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, CompressedLinear)
    assert isinstance(loaded.model.embed_tokens, CompressedEmbedding) and isinstance(loaded.lm_head, TiedLinear)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_a_requested_dtype_casts_the_dense_weights_and_never_the_formats(saved):
    model, directory = saved
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    layer, original = loaded.model.layers[0].mlp.gate_proj, model.model.layers[0].mlp.gate_proj
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    assert {k: getattr(layer, k).dtype for k in layer._format_keys} == {k: getattr(original, k).dtype for k in original._format_keys}
    assert torch.equal(layer.fmt.decode(), original.fmt.decode())


def test_pipeline_generates_from_the_checkpoint_directory(saved):
    model, directory = saved
    generator = transformers.pipeline("text-generation", model=str(directory))
    assert isinstance(generator.model.model.layers[0].self_attn.k_proj, CompressedLinear)
    out = generator("def f", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("def f")


def test_save_pretrained_then_from_pretrained_round_trips(saved, tmp_path):
    model, directory = saved
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory)
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / HF_CONFIG).is_file()
    assert torch.equal(logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again"), IDS), logits(model, IDS))


def test_a_tampered_checkpoint_is_refused_through_from_pretrained(saved, tmp_path):
    import shutil

    _, directory = saved
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    data = bytearray((copy / TENSORS).read_bytes())
    data[-1] ^= 0xFF
    (copy / TENSORS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 does not match the manifest"):
        transformers.AutoModelForCausalLM.from_pretrained(copy)


def test_from_pretrained_does_not_compress_a_model_on_the_fly(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="pre-quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=config_class()())


def test_a_checkpoint_is_loaded_as_its_own_class_or_refused_naming_it(saved):
    _, directory = saved
    with pytest.raises(CheckpointError, match="holds a compressed LlamaForCausalLM"):
        transformers.AutoModel.from_pretrained(directory)  # the base LlamaModel: other layer names


def test_compressing_a_checkpoint_again_is_refused_saying_what_to_do(saved, capsys):
    from matpress.cli import main

    _, directory = saved
    assert main(["compress", str(directory), "--out", str(directory.parent / "again")]) == 2
    assert "is a matpress checkpoint, compressed already: read it with matpress.load" in capsys.readouterr().err


def test_sentence_transformers_loads_a_compressed_minilm_with_identical_embeddings(tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from matpress.evaluation import sentence_embeddings
    from matpress.models import load_pretrained

    loaded = load_pretrained("minilm")  # built without BERT's pooler, as matpress uses MiniLM
    matpress.compress(loaded.model, {"default": {"method": "rtn", "bits": 4, "group_size": 32}}, progress=False)
    matpress.save(loaded.model, tmp_path / "minilm", tokenizer=loaded.tokenizer, source="minilm")
    st = sentence_transformers.SentenceTransformer(str(tmp_path / "minilm"), device="cpu")
    assert isinstance(st[0].auto_model.encoder.layer[0].attention.self.query, CompressedLinear)
    assert st[0].auto_model.pooler is None  # not stored, so not made up
    texts = ["a cat sat on the mat", "weight matrices made cheaper"]
    ours = sentence_embeddings(loaded.model, loaded.tokenizer, texts)
    assert torch.equal(torch.from_numpy(st.encode(texts, normalize_embeddings=True)), ours)


def test_import_matpress_leaves_transformers_quantizers_unimported_until_from_pretrained_needs_them():
    import subprocess
    import sys

    code = ("import sys, matpress; assert 'transformers.quantizers.auto' not in sys.modules; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m; assert 'matpress' in m")
    subprocess.run([sys.executable, "-c", code], check=True)
