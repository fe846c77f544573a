"""AFNet-M network: shapes, modes, gradients, IWC weights, MA and config handling."""

import pytest
import torch

from realtime.spec import EXPRESSIONS, GEOMETRY_CHANNELS, MASK_NAMES
from train.model import MODES, AFNetConfig, build_model, count_parameters, list_variants, resolve_config

TINY = dict(input_size=32, width=0.125, blocks=(1, 1, 1, 1))  # channels 8, 16, 32, 64


def inputs(batch, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    texture = torch.rand(batch, 3, size, size, generator=g)
    geometry = torch.randn(batch, len(GEOMETRY_CHANNELS), size, size, generator=g) * 0.5
    return texture, geometry, region_masks(batch, size, g)


def region_masks(batch, size, g):
    """Disjoint rectangles per region (eyes, brows, nose, mouth), shifted per sample, like real masks."""
    masks = torch.zeros(batch, len(MASK_NAMES), size, size)
    q = size // 8
    boxes = [(3, 1), (3, 5), (2, 1), (2, 5), (4, 3), (6, 3)]  # (row, column) in eighths
    for b in range(batch):
        dr, dc = torch.randint(-1, 2, (2,), generator=g).tolist()
        for k, (r, c) in enumerate(boxes):
            masks[b, k, r * q + dr:(r + 1) * q + dr, c * q + dc:(c + 2) * q + dc] = 1.0
    return masks


def tiny(mode="full", **kw):
    torch.manual_seed(0)
    return build_model("afnet_m", mode=mode, **{**TINY, **kw})


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_same_interface_for_batches_1_2_5(mode):
    model = tiny(mode).eval()
    fuse = len(model.config.fuse_stages)
    for batch in (1, 2, 5):
        with torch.no_grad():
            logits, weights = model(*inputs(batch))
        assert logits.shape == (batch, len(EXPRESSIONS))
        assert weights.shape == (batch, fuse, 2)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("mode, expected", [("2d", (1.0, 0.0)), ("3d", (0.0, 1.0)),
                                            ("late_concat", (0.5, 0.5)), ("ma", (0.5, 0.5))])
def test_modes_without_iwc_report_constant_weights(mode, expected):
    _, weights = tiny(mode).eval()(*inputs(3))
    assert torch.equal(weights, torch.tensor(expected).expand(3, 3, 2))


@pytest.mark.parametrize("mode", ["iwc", "full"])
def test_iwc_weights_are_per_sample_non_negative_and_sum_to_one(mode):
    model = tiny(mode).eval()
    with torch.no_grad():
        _, weights = model(*inputs(4))
    assert (weights >= 0).all()
    assert torch.allclose(weights.sum(dim=-1), torch.ones(4, 3), atol=1e-6)
    assert not torch.allclose(weights[0], weights[1])  # computed from each sample, not constant


def test_gradients_reach_both_streams_ma_and_iwc():
    model = tiny("full").train()
    texture, geometry, masks = inputs(4)
    logits, _ = model(texture, geometry, masks)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    probes = {
        "2D stem": model.stream_2d.stem[0].weight,
        "3D stem": model.stream_3d.stem[0].weight,
        "2D MA MLP (inside)": model.ma_2d["1"].mlp_in[0].weight,
        "3D MA MLP (outside)": model.ma_3d["2"].mlp_out[0].weight,
        "MA region weights": model.ma_2d["3"].region_logits,
        "IWC stage 2": model.iwc["2"].mlp[0].weight,
        "IWC stage 4": model.iwc["4"].mlp[2].weight,
    }
    for name, param in probes.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_masks_change_the_output_only_where_ma_is_used():
    texture, geometry, masks = inputs(2)
    zero = torch.zeros_like(masks)
    with torch.no_grad():
        full = tiny("full").eval()
        assert not torch.allclose(full(texture, geometry, masks)[0], full(texture, geometry, zero)[0])
        iwc = tiny("iwc").eval()
        assert torch.equal(iwc(texture, geometry, masks)[0], iwc(texture, geometry, zero)[0])


def test_union_mask_combine_has_no_region_weights_and_runs():
    model = tiny("full", mask_combine="union").eval()
    assert not any("region_logits" in n for n, _ in model.named_parameters())
    logits, _ = model(*inputs(2))
    assert logits.shape == (2, len(EXPRESSIONS))


def test_depth_only_geometry_ignores_the_normal_channels():
    model = tiny("3d", in_geometry=1).eval()
    texture, geometry, masks = inputs(2)
    other = geometry.clone()
    other[:, 1:] = torch.randn_like(other[:, 1:])
    with torch.no_grad():
        assert torch.equal(model(texture, geometry, masks)[0], model(texture, other, masks)[0])
        assert not torch.equal(model(texture, geometry, masks)[0], model(texture, geometry * 2, masks)[0])


def test_custom_class_list_sets_the_logit_count():
    model = tiny(class_names=("a", "b", "c")).eval()
    assert model(*inputs(2))[0].shape == (2, 3)


def test_wrong_input_shape_is_a_clear_error():
    model = tiny().eval()
    texture, geometry, masks = inputs(2)
    with pytest.raises(ValueError, match="masks has shape"):
        model(texture, geometry, masks[:, :4])
    with pytest.raises(ValueError, match="texture has shape"):
        model(texture[..., :16, :16], geometry, masks)


def test_config_round_trips_and_refuses_unknown_keys():
    cfg = resolve_config("afnet_m_rt", mode="iwc")
    assert AFNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys.*wdth"):
        AFNetConfig.from_dict({**cfg.to_dict(), "wdth": 2})
    with pytest.raises(ValueError, match="unknown keys"):
        build_model("afnet_m", depth=3)


@pytest.mark.parametrize("bad, match", [
    (dict(mode="late"), "mode"),
    (dict(fuse_stages=(2, 3)), "last fuse stage"),
    (dict(ma_stages=(3, 1)), "ma_stages"),
    (dict(in_geometry=5), "in_geometry"),
    (dict(mask_combine="mean"), "mask_combine"),
    (dict(input_size=100), "not a multiple"),
])
def test_invalid_configs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        AFNetConfig(**bad)


def test_unknown_variant_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="afnet_m_rt"):
        build_model("afnet_x")


def test_registered_variants_and_parameter_budget():
    assert {"afnet_m", "afnet_m_rt"} <= set(list_variants())
    big = count_parameters(build_model("afnet_m"))
    rt = count_parameters(build_model("afnet_m_rt"))
    assert 20e6 < big <= 23e6  # two ResNet-18 trunks plus MA/IWC
    assert rt < big / 3
    two_d = count_parameters(build_model("afnet_m", mode="2d"))
    assert 10.5e6 < two_d < 11.5e6  # one ResNet-18 trunk without its 1000-class head
