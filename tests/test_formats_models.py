"""The new formats and methods inside whole models: recipes, calibration, save/load, matpress info."""

import torch

import matpress
from conftest import tiny_llama
from matpress.walk import CalibrationData, collect_stats
from matpress.cli import main

RECIPE = {
    "default": {"method": "eora", "bits": 3, "group_size": 32, "rank": 4},
    "rules": [
        {"pattern": "*.mlp.down_proj", "method": "sparsegpt", "nm": "2:4", "value_bits": 4, "group_size": 16},
        {"pattern": "*.mlp.up_proj", "method": "wanda", "sparsity": 0.75},
        {"pattern": "*.mlp.gate_proj", "method": "ternary_calibrated", "group_size": 32},
        {"pattern": "*.self_attn.o_proj", "method": "monarch_aw", "nblocks": 4},
        {"pattern": "*.self_attn.k_proj", "method": "svd_llm", "energy": 0.9},
    ],
}


def test_mixed_recipe_compresses_saves_loads_and_shows_each_layers_format(tmp_path, capsys):
    model = tiny_llama()
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (8, 32))
    stats = collect_stats(model, CalibrationData.from_token_ids(ids, batch_size=4), progress=False)
    with torch.no_grad():
        dense_logits = model(ids[:2]).logits
    report = matpress.compress(model, RECIPE, stats=stats, progress=False)
    formats = {r.name.split(".", 3)[-1]: r.format for r in report.layers if ".layers.0." in r.name}
    assert formats["self_attn.q_proj"] == "sum(int3 g32 asym + lowrank r4 fp16)"
    assert formats["mlp.down_proj"] == "sparse 2:4 int4 g8 asym"
    assert formats["mlp.up_proj"] == "sparse 75% bitmask fp16"
    assert formats["mlp.gate_proj"] == "ternary g32"
    assert formats["self_attn.o_proj"] == "monarch b4x4 fp16"
    assert formats["self_attn.k_proj"].startswith("lowrank r")
    with torch.no_grad():
        logits = model(ids[:2]).logits
    # a lightly compressed random model still tracks its original
    assert torch.nn.functional.cosine_similarity(logits.flatten(), dense_logits.flatten(), dim=0) > 0.5
    out = matpress.save(model, tmp_path / "ckpt", recipe=matpress.Recipe.from_dict(RECIPE))
    loaded = matpress.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids[:2]).logits, logits)
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "| model.layers.1.self_attn.v_proj | 32x64 | sum(int3 g32 asym + lowrank r4 fp16) |" in info
    assert "sparse 2:4 int4 g8 asym" in info and "ternary g32" in info
