"""model.checkpoint: release-layout save/load (bit-exact round trip), the encodings the
release allows, realistic random weights, and clear errors for bad checkpoints."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4_triton import formats as F
from model import CheckpointError, DSV4Model, load_checkpoint, random_init, save_checkpoint
from model.checkpoint import INDEX_FILE, _random_weight, dequantize_fp8_blocks, quantize_fp8_blocks, weight_specs
from model.config import get_config
from test_model_forward import one_cpu_thread  # noqa: F401  (autouse: one intra-op thread)

TINY = get_config("tiny")
TINY_MTP = TINY.replace(num_nextn_predict_layers=1, compress_ratios=TINY.compress_ratios + (0,))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (compares NaNs and -0.0 exactly)."""
    return t.detach().cpu().contiguous().view(torch.uint8)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and sa[name].shape == sb[name].shape, name
        assert torch.equal(bits(sa[name]), bits(sb[name])), f"{name} differs"


@pytest.fixture(scope="module")
def tiny_model(one_cpu_thread):
    return DSV4Model.from_pretrained(TINY_MTP, device="cpu", max_seq_len=64, seed=3)


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    files = save_checkpoint(tiny_model, path, shard_size=1 << 20)
    assert len(files) > 1  # several shards at this size
    return path


def load_tensors(path):
    """All tensors of a checkpoint directory, by stored name."""
    out = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(path, file), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def write_checkpoint(path, tensors, config=TINY_MTP):
    """One shard, no index (the loader must then read the shard headers)."""
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    config.to_json(os.path.join(path, "config.json"))
    return path


def fresh(config=TINY_MTP):
    return DSV4Model(config, device="cpu", max_seq_len=64)


def test_save_load_round_trip_is_bit_exact(tiny_model, saved):
    index = json.loads((saved / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(tiny_model.state_dict())
    assert (saved / "config.json").exists()
    loaded = DSV4Model.from_pretrained(saved, device="cpu", max_seq_len=64)
    assert loaded.config == tiny_model.config and len(loaded.mtp) == 1
    assert_same_weights(loaded, tiny_model)
    for la, lb in zip(loaded.layers, tiny_model.layers):
        for pa, pb in zip(la.ffn.packed, lb.ffn.packed):
            assert torch.equal(bits(pa), bits(pb))


def test_release_encodings(saved, tmp_path):
    """FP4 as int8 (as saved), the scale alias, int64 tid2eid: all load to the same model."""
    tensors = load_tensors(saved)
    assert tensors["layers.0.ffn.experts.0.w1.weight"].dtype == torch.int8  # the release's storage
    alt = dict(tensors)
    for name in [n for n in alt if n.endswith("w2.weight") and ".experts." in n][:3]:
        alt[name] = alt[name].view(torch.float4_e2m1fn_x2)
    for name in [n for n in alt if n.endswith("w3.weight") and ".experts." in n][:3]:
        alt[name] = alt[name].view(torch.uint8)
    alt["layers.1.attn.wq_a.weight_scale_inv"] = alt.pop("layers.1.attn.wq_a.scale")
    alt["layers.0.ffn.gate.tid2eid"] = alt["layers.0.ffn.gate.tid2eid"].to(torch.int64)
    a = fresh()
    load_checkpoint(a, write_checkpoint(tmp_path / "alt", alt))
    assert_same_weights(a, DSV4Model.from_pretrained(saved, device="cpu", max_seq_len=64))


def test_fp8_wo_a_is_dequantised_on_load(saved, tmp_path):
    tensors = load_tensors(saved)
    name = "layers.2.attn.wo_a.weight"
    q, scale = quantize_fp8_blocks(tensors[name].float())
    tensors[name] = q
    tensors["layers.2.attn.wo_a.scale"] = scale
    m = fresh()
    load_checkpoint(m, write_checkpoint(tmp_path / "fp8", tensors))
    got = m.layers[2].attn.wo_a.weight
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, dequantize_fp8_blocks(q, scale).to(torch.bfloat16))


def test_checkpoint_without_mtp_drops_the_mtp_layer(saved, tmp_path):
    tensors = {k: v for k, v in load_tensors(saved).items() if not k.startswith("mtp.")}
    m = fresh()
    report = load_checkpoint(m, write_checkpoint(tmp_path / "nomtp", tensors))
    assert report.dropped_mtp and len(m.mtp) == 0 and not report.missing


@pytest.mark.parametrize("mutation, err, pattern", [
    ("missing", CheckpointError, r"missing tensor\(s\): layers\.1\.attn\.kv_norm\.weight"),
    ("extra", CheckpointError, r"unexpected tensor\(s\): layers\.1\.attn\.bogus"),
    ("shape", CheckpointError, r"layers\.1\.attn\.wq_b\.weight: expected shape \(1024, 128\), got \(1024, 64\)"),
    ("dtype_fp8", TypeError, r"layers\.1\.attn\.wkv\.weight: expected dtype float8_e4m3fn, got bfloat16"),
    ("dtype_norm", TypeError, r"layers\.0\.attn_norm\.weight: expected dtype bfloat16/float16/float32, got int8"),
    ("dtype_scale", TypeError, r"experts\.1\.w2\.scale: expected dtype float8_e8m0fnu, got float32"),
    ("tid2eid_range", CheckpointError, r"tid2eid: expert ids must lie in \[0, 8\)"),
])
def test_bad_checkpoint_names_the_tensor(saved, tmp_path, mutation, err, pattern):
    t = load_tensors(saved)
    if mutation == "missing":
        del t["layers.1.attn.kv_norm.weight"]
    elif mutation == "extra":
        t["layers.1.attn.bogus"] = torch.zeros(3)
    elif mutation == "shape":
        t["layers.1.attn.wq_b.weight"] = t["layers.1.attn.wq_b.weight"][:, :64].contiguous()
    elif mutation == "dtype_fp8":
        t["layers.1.attn.wkv.weight"] = t["layers.1.attn.wkv.weight"].to(torch.bfloat16)
    elif mutation == "dtype_norm":
        t["layers.0.attn_norm.weight"] = torch.ones(256, dtype=torch.int8)
    elif mutation == "dtype_scale":
        name = "layers.3.ffn.experts.1.w2.scale"
        t[name] = F.e8m0_to_float(t[name])
    elif mutation == "tid2eid_range":
        t["layers.0.ffn.gate.tid2eid"][5, 1] = 8
    with pytest.raises(err, match=pattern):
        load_checkpoint(fresh(), write_checkpoint(tmp_path / mutation, t))


def test_non_strict_skips_and_fills(saved, tmp_path):
    t = load_tensors(saved)
    del t["layers.1.attn.kv_norm.weight"]
    t["layers.1.attn.bogus"] = torch.zeros(3)
    m = fresh()
    report = load_checkpoint(m, write_checkpoint(tmp_path / "lenient", t), strict=False, seed=3)
    assert report.skipped == ["layers.1.attn.bogus"] and report.missing == ["layers.1.attn.kv_norm.weight"]
    # the missing tensor is the one random_init draws for that name and seed
    name = "layers.1.attn.kv_norm.weight"
    specs = weight_specs(m)
    assert torch.equal(m.layers[1].attn.kv_norm.weight, _random_weight(name, specs[name], specs, 3, TINY_MTP)[name])


def test_truncated_and_corrupt_files(saved, tmp_path):
    bad = tmp_path / "trunc"
    bad.mkdir()
    for file in os.listdir(saved):
        data = (saved / file).read_bytes()
        (bad / file).write_bytes(data[:len(data) // 2] if file.startswith("model-00002-of-") else data)
    with pytest.raises(CheckpointError, match=r"model-00002-of-\d+\.safetensors: cannot be read \(truncated"):
        load_checkpoint(fresh(), bad)
    (bad / INDEX_FILE).write_text("{\"weight_map\": {\"embed.weight\": \"nope.safetensors\"}}")
    with pytest.raises(CheckpointError, match="embed.weight is in nope.safetensors, which does not exist"):
        load_checkpoint(fresh(), bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(fresh(), empty)


def test_random_init_is_realistic_and_seeded():
    a = random_init(TINY, seed=1)
    assert set(a) == set(weight_specs(DSV4Model(TINY, device="meta")))
    specs = weight_specs(DSV4Model(TINY, device="meta"))
    name = "layers.1.attn.wq_b.weight"
    for seed, same in ((1, True), (2, False)):
        again = _random_weight(name, specs[name], specs, seed, TINY)[name]
        assert torch.equal(bits(a[name]), bits(again)) == same
    # FP8 weights: ~N(0, 1/fan_in) after dequantisation, E8M0 block scales that use the FP8 range
    w = dequantize_fp8_blocks(a["layers.1.attn.wq_b.weight"], a["layers.1.attn.wq_b.scale"])
    assert abs(w.std().item() * 128 ** 0.5 - 1) < 0.05
    q = a["layers.1.attn.wq_b.weight"].float().abs()
    assert 224 < q.max() <= 448
    # FP4 experts likewise (dequantised through the shared codecs)
    codes = F.fp4_unpack(a["layers.1.ffn.experts.0.w1.weight"])
    scale = F.e8m0_to_float(a["layers.1.ffn.experts.0.w1.scale"]).repeat_interleave(32, 1)
    w4 = F.fp4_decode(codes) * scale
    assert abs(w4.std().item() * 256 ** 0.5 - 1) < 0.1
    assert a["layers.1.ffn.experts.0.w1.weight"].dtype == torch.uint8
    # norms ~ 1, router bias 0, mHC small, tid2eid distinct valid experts per token
    assert abs(a["layers.1.attn.kv_norm.weight"].float().mean().item() - 1) < 0.05
    assert not a["layers.1.ffn.gate.bias"].any()
    assert a["layers.1.hc_attn_fn"].abs().max() < 0.02
    tid = a["layers.0.ffn.gate.tid2eid"]
    assert tid.dtype == torch.int32 and tid.shape == (1000, 2) and int(tid.min()) >= 0 and int(tid.max()) < 8
    assert (tid[:, 0] != tid[:, 1]).all()


def test_fp8_block_quantiser_follows_act_quant_rule():
    w = torch.randn(130, 200) * 3
    w[0, 0] = 1000.0  # one big block
    q, scale = quantize_fp8_blocks(w)
    assert q.shape == (130, 200) and scale.shape == (2, 2) and scale.dtype == torch.float8_e8m0fnu
    s = F.e8m0_to_float(scale)
    assert s[0, 0] == 2.0 ** 2  # amax 1000 / 448 = 2.23 -> 2^2
    # the block's amax lands inside the top FP8 binade, and dequantisation is within half an FP8 step
    d = dequantize_fp8_blocks(q, scale)
    # (E4M3 normals: 3 mantissa bits, half a step is 2^-4 relative; subnormals: half of 2^-9 * scale)
    block_scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:130, :200]
    assert ((d - w).abs() <= 2.0 ** -4 * w.abs() + 2.0 ** -10 * block_scale).all()
