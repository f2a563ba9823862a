"""model.config: presets as SPEC 1 writes them, JSON round trip, clear errors."""

import json

import pytest

from model.config import DSV4Config, PRESETS, get_config


def test_flash_layer_schedule():
    c = get_config("flash")
    assert c.num_hidden_layers == 43 and c.num_nextn_predict_layers == 1
    main = c.compress_ratios[:43]
    assert main[:2] == (0, 0)
    assert all(main[i] == 4 for i in range(2, 43, 2))
    assert all(main[i] == 128 for i in range(3, 42, 2))
    assert c.compress_ratios[43] == 0  # the MTP layer
    assert (c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.o_groups, c.index_topk) == (4096, 64, 1024, 8, 512)
    assert (c.n_routed_experts, c.moe_intermediate_size, c.routed_scaling_factor) == (256, 2048, 1.5)


def test_pro_layer_schedule():
    c = get_config("pro")
    main = c.compress_ratios[:61]
    assert main[:2] == (128, 128)
    assert all(main[i] == 4 for i in range(2, 61, 2))
    assert all(main[i] == 128 for i in range(3, 60, 2))
    assert c.compress_ratios[61] == 0
    assert (c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.o_groups) == (7168, 128, 1536, 16)
    assert c.index_topk == 1024
    assert (c.n_routed_experts, c.moe_intermediate_size, c.routed_scaling_factor) == (384, 3072, 2.5)


def test_tiny_preset():
    c = get_config("tiny")
    assert c.compress_ratios == (0, 4, 128, 4) and c.num_nextn_predict_layers == 0
    assert c.yarn == {"factor": 16, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
    assert (c.hidden_size, c.num_attention_heads, c.head_dim, c.sliding_window, c.index_topk) == (256, 8, 128, 16, 8)
    assert (c.vocab_size, c.num_hash_layers, c.n_routed_experts, c.num_experts_per_tok) == (1000, 1, 8, 2)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(tmp_path, name):
    c = get_config(name)
    path = tmp_path / "config.json"
    c.to_json(path)
    back = DSV4Config.from_json(tmp_path)  # a directory holding config.json
    assert back == c and back.to_dict() == c.to_dict()


def test_descriptive_keys_are_kept_and_written_back():
    data = get_config("tiny").to_dict()
    data.update(architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", eos_token_id=1)
    c = DSV4Config.from_dict(data)
    assert json.loads(c.to_json()) == json.loads(json.dumps(data))


def _tiny_with(**changes):
    data = get_config("tiny").to_dict()
    data.update(changes)
    return data


@pytest.mark.parametrize("changes, field", [
    (dict(unknown_knob=3), "unknown_knob"),
    (dict(num_attention_heads=7), "o_groups"),
    (dict(compress_ratios=[0, 4, 128]), "compress_ratios"),
    (dict(compress_ratios=[0, 4, 64, 4]), "compress_ratios"),
    (dict(num_nextn_predict_layers=1), "compress_ratios"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn", "factor": 16, "beta_fast": 32, "beta_slow": 1}),
     "original_max_position_embeddings"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(index_head_dim=96), "index_head_dim"),
    (dict(head_dim=100), "head_dim"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(hc_mult=2), "hc_mult"),
    (dict(expert_dtype="fp8"), "expert_dtype"),
    (dict(num_hash_layers=5), "num_hash_layers"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        DSV4Config.from_dict(_tiny_with(**changes))


def test_missing_field_is_named():
    data = get_config("tiny").to_dict()
    del data["index_topk"]
    with pytest.raises(ValueError, match="index_topk"):
        DSV4Config.from_dict(data)


def test_bad_json_and_unknown_preset(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DSV4Config.from_json(tmp_path / "config.json")
    with pytest.raises(ValueError, match="preset"):
        get_config("huge")


@pytest.mark.parametrize("preset", ["pro", "flash"])
@pytest.mark.parametrize("ratio", [0, 4, 128])
def test_one_layer_config_of_the_layer_profile(preset, ratio):
    """benchmarks/profile_layer.py's model: one layer of the preset's shapes, score routing."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "profile_layer.py"
    spec = importlib.util.spec_from_file_location("profile_layer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c, full = module.one_layer_config(preset, ratio), get_config(preset)
    assert (c.num_hidden_layers, c.num_nextn_predict_layers, c.num_hash_layers, c.compress_ratios) == (1, 0, 0, (ratio,))
    assert (c.hidden_size, c.n_routed_experts, c.moe_intermediate_size) == (full.hidden_size, full.n_routed_experts,
                                                                             full.moe_intermediate_size)
