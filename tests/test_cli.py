import pytest

from matpress.cli import main
from matpress.models import load_pretrained


def test_compress_info_eval_on_a_local_causal_lm(tiny_causal_dir, tmp_path, capsys):
    out = tmp_path / "int4"
    assert main(["compress", str(tiny_causal_dir), "--method", "rtn", "--bits", "4", "--group", "32", "--out", str(out), "--quiet"]) == 0
    assert "int4 g32 asym" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in info and "LlamaForCausalLM" in info
    assert main(["eval", str(out), "--quiet"]) == 0
    values = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert float(values["kl_mean"]) > 0
    assert float(values["perplexity"]) > 1


def test_per_channel_and_symmetric_flags(tiny_causal_dir, tmp_path, capsys):
    out = tmp_path / "ch"
    assert main(["compress", str(tiny_causal_dir), "--bits", "3", "--group", "channel", "--symmetric", "--out", str(out), "--quiet"]) == 0
    assert "int3 ch sym" in capsys.readouterr().out


def test_codebook_shorthand_flags(tiny_causal_dir, tmp_path, capsys):
    out = tmp_path / "cb"
    args = ["compress", str(tiny_causal_dir), "--method", "gptq_codebook", "--bits", "3", "--group", "16", "--table", "layer", "--rotate"]
    assert main([*args, "--samples", "8", "--seq-len", "16", "--out", str(out), "--quiet"]) == 0
    assert "rotated codebook3 g16 layer" in capsys.readouterr().out


def test_minilm_8_bit_through_the_cli(tmp_path, capsys):
    out = tmp_path / "minilm8"
    assert main(["compress", "minilm", "--bits", "8", "--group", "128", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--sentences", "40", "--quiet"]) == 0
    values = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert float(values["cosine_mean"]) >= 0.999


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compress", "/no/such/dir", "--out", "x"], "not a Hugging Face model directory"),
        (["compress", "minilm", "--bits", "9", "--out", "x"], "bits must be an integer from 2 to 8"),
        (["info", "/no/such/ckpt"], "not a matpress checkpoint"),
        (["eval", "/no/such/ckpt"], "not a matpress checkpoint"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_group_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compress", "minilm", "--group", "abc", "--out", "x"])
    assert e.value.code == 2
    assert "--group takes a positive integer or 'channel'" in capsys.readouterr().err


def test_load_pretrained_refuses_a_non_model_directory(tmp_path):
    from matpress.errors import MatpressError

    with pytest.raises(MatpressError, match="no config.json"):
        load_pretrained(str(tmp_path))
