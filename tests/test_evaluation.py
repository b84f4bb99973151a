import math
import types

import pytest
import torch
from torch import nn

from matpress.errors import CalibrationError
from matpress.evaluation import embedding_fidelity, language_model_quality, reference_log_probs
from matpress.evaluation.text import CALIBRATION, EVALUATION, corpus, sentences


def test_builtin_splits_are_disjoint_and_large_enough():
    calib, evals = sentences(split=CALIBRATION), sentences(split=EVALUATION)
    assert len(evals) >= 600 and len(calib) >= 500
    assert not set(calib) & set(evals)
    assert all(len(s.split()) >= 6 for s in evals)
    assert corpus(CALIBRATION) != corpus(EVALUATION)


def test_user_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("One two three four five six seven. Eight nine ten eleven twelve thirteen!\n")
    assert sentences(text_file=f) == ["One two three four five six seven.", "Eight nine ten eleven twelve thirteen!"]
    with pytest.raises(CalibrationError, match="fewer than the 5"):
        sentences(5, text_file=f)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(CalibrationError, match="is empty"):
        sentences(text_file=tmp_path / "empty.txt")
    with pytest.raises(CalibrationError, match="does not exist"):
        corpus(text_file=tmp_path / "missing.txt")


def test_identical_embeddings_have_perfect_fidelity():
    e = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    m = embedding_fidelity(e, e)
    assert m["cosine_mean"] == pytest.approx(1.0) and m["top10_agreement"] == 1.0


def test_fidelity_of_orthogonal_embeddings_is_zero():
    e = torch.eye(40)
    perm = torch.roll(torch.eye(40), 1, dims=1)
    assert embedding_fidelity(e, perm)["cosine_mean"] == pytest.approx(0.0)


class ConstantLM(nn.Module):
    """A language model whose next-token logits are the same fixed vector everywhere."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, ids):
        return types.SimpleNamespace(logits=self.logits.expand(*ids.shape, -1))


def test_uniform_model_has_perplexity_equal_to_vocabulary_size():
    windows = torch.randint(0, 50, (3, 20))
    result = language_model_quality(ConstantLM(torch.zeros(50)), windows)
    assert result["perplexity"] == pytest.approx(50.0, rel=1e-5)
    assert result["n_tokens"] == 3 * 19


def test_kl_matches_closed_form():
    p_logits, q_logits = torch.randn(7), torch.randn(7)
    windows = torch.randint(0, 7, (2, 9))
    result = language_model_quality(ConstantLM(q_logits), windows, reference=ConstantLM(p_logits))
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    assert result["kl_mean"] == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    same = language_model_quality(ConstantLM(p_logits), windows, reference=ConstantLM(p_logits))
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-7)
    assert same["perplexity"] == pytest.approx(same["reference_perplexity"])
    assert math.isfinite(result["perplexity"])


def test_precomputed_reference_log_probs_give_the_same_scores():
    # the closed-form KL above, with the reference's log-probabilities computed once beforehand
    p_logits, q_logits = torch.randn(7), torch.randn(7)
    windows = torch.randint(0, 7, (5, 9))
    reference = ConstantLM(p_logits)
    direct = language_model_quality(ConstantLM(q_logits), windows, reference=reference, batch_size=2)
    logp = reference_log_probs(reference, windows, batch_size=2)
    assert [t.shape for t in logp] == [(2, 8, 7), (2, 8, 7), (1, 8, 7)]
    cached = language_model_quality(ConstantLM(q_logits), windows, reference=logp, batch_size=2)
    assert cached == pytest.approx(direct, rel=1e-6)
    with pytest.raises(ValueError, match="2 batches of reference log-probabilities for 5 batches"):
        language_model_quality(ConstantLM(q_logits), windows, reference=logp[:2], batch_size=1)


def test_benchmark_headers_name_the_cpu_generation_and_the_instruction_set_settings(monkeypatch):
    from pathlib import Path

    from matpress.evaluation import timing

    for name in timing.ISA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert timing.command_line(["--out", "a b.md"]).startswith("python ") and "'a b.md'" in timing.command_line(["--out", "a b.md"])
    monkeypatch.setenv("MATPRESS_KERNEL_ISA", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert timing.command_line(["--x"]).startswith("MATPRESS_KERNEL_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python ")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "cpu family" in cpuinfo.read_text():
        text = cpuinfo.read_text().split("\n\n")[0]
        family = next(line.split(":")[1].strip() for line in text.splitlines() if line.startswith("cpu family"))
        assert f"(family {family}, model " in timing.machine_description()
