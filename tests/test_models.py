"""Tests for the model registry, the backbones and the feature taps (CPU, tiny inputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfkd.errors import ConfigError, ModelError
from selfkd.models import MODELS, FeatureTaps, available_taps, build_model
from selfkd.models.preact_resnet import PreActBlock

# name -> (input size, stage channels, stage spatial sizes, pooled width) at in_channels=3
EXPECTED = {
    "preact_resnet18": (32, [64, 128, 256, 512], [32, 16, 8, 4], 512),
    "densenet121_cifar": (32, [256, 512, 1024, 1024], [32, 16, 8, 4], 1024),
    "resnet8": (32, [16, 32, 64], [32, 16, 8], 64),
    "resnet14": (32, [16, 32, 64], [32, 16, 8], 64),
    "resnet20": (32, [16, 32, 64], [32, 16, 8], 64),
    "resnet18": (64, [64, 128, 256, 512], [16, 8, 4, 2], 512),
    "resnet50": (64, [256, 512, 1024, 2048], [16, 8, 4, 2], 2048),
    "densenet121": (64, [256, 512, 1024, 1024], [16, 8, 4, 2], 1024),
}

_CACHE: dict[tuple[str, int, int], nn.Module] = {}


def cached(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build each (big) model once per test session; tests must not modify its weights."""
    key = (name, num_classes, in_channels)
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = build_model(name, num_classes, in_channels).eval()
    return _CACHE[key]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_model_is_expected_and_described() -> None:
    assert set(MODELS.names()) == set(EXPECTED)
    for name, line in MODELS.describe():
        assert line, f"{name} has no one-line docstring"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_output_shapes_and_taps(name: str) -> None:
    size, channels, spatial, pooled_dim = EXPECTED[name]
    model = cached(name)
    taps = available_taps(model)
    stages = [f"stage{i}" for i in range(1, len(channels) + 1)]
    assert set(taps) == {*stages, "features", "pooled"}
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.in_features == pooled_dim
    assert model.classifier.out_features == 10

    x = torch.randn(2, 3, size, size)
    with torch.no_grad(), FeatureTaps(model, [*stages, "features", "pooled"]) as t:
        logits = model(x)
        assert logits.shape == (2, 10)
        for stage, c, s in zip(stages, channels, spatial, strict=True):
            assert t[stage].shape == (2, c, s, s), stage
        features, pooled = t["features"], t["pooled"]
    assert features.shape == (2, pooled_dim, spatial[-1], spatial[-1])
    assert pooled.shape == (2, pooled_dim)
    # pooled = global average of the final feature map; logits = classifier(pooled)
    torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, model.classifier(pooled))


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("resnet8", 28),
        ("resnet20", 8),
        ("preact_resnet18", 32),
        ("densenet121_cifar", 32),
        ("resnet18", 32),
        ("densenet121", 64),
    ],
)
def test_one_channel_input(name: str, size: int) -> None:
    model = cached(name, num_classes=7, in_channels=1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 7)


def test_resnet50_one_channel_replaces_first_conv() -> None:
    model = build_model("resnet50", 5, in_channels=1)
    assert model.conv1.in_channels == 1
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)


def test_cifar_resnet_width_option() -> None:
    model = build_model("resnet8", 10, in_channels=1, width=8)
    assert model.classifier.in_features == 32
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="width"):
        build_model("resnet8", 10, width=0)


def preact_resnet18_param_count(num_classes: int) -> int:
    """Parameters of PS-KD's PreAct ResNet-18, counted from the layer shapes by hand."""

    def conv(cin: int, cout: int, k: int) -> int:  # bias-free convolution
        return cin * cout * k * k

    def bn(c: int) -> int:  # affine weight + bias (running stats are buffers)
        return 2 * c

    def block(cin: int, cout: int, stride: int) -> int:
        total = bn(cin) + conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3)
        if stride != 1 or cin != cout:
            total += conv(cin, cout, 1)  # projection shortcut: 1x1 conv, no BN
        return total

    total = conv(3, 64, 3) + bn(64)  # stem
    cin = 64
    for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        total += block(cin, width, stride) + block(width, width, 1)
        cin = width
    return total + 512 * num_classes + num_classes  # Linear(512, K) with bias


def test_preact_resnet18_parameter_count() -> None:
    # Written out for K=100:
    #   stem  3*64*9 + 2*64                                             =      1,856
    #   layer1 2 x (2*64 + 64*64*9 + 2*64 + 64*64*9)                    =    147,968
    #   layer2 (2*64 + 64*128*9 + 2*128 + 128*128*9 + 64*128)
    #          + (2*128 + 2*128*128*9 + 2*128)                          =    525,184
    #   layer3 (2*128 + 128*256*9 + 2*256 + 256*256*9 + 128*256)
    #          + (2*256 + 2*256*256*9 + 2*256)                          =  2,098,944
    #   layer4 (2*256 + 256*512*9 + 2*512 + 512*512*9 + 256*512)
    #          + (2*512 + 2*512*512*9 + 2*512)                          =  8,392,192
    #   linear 512*100 + 100                                            =     51,300
    #   total                                                           = 11,217,444
    assert (
        1_856 + 147_968 + 525_184 + 2_098_944 + 8_392_192 + 51_300
        == preact_resnet18_param_count(100)
        == 11_217_444
    )
    assert n_params(cached("preact_resnet18", 100)) == 11_217_444
    assert n_params(build_model("preact_resnet18", 10)) == preact_resnet18_param_count(10)
    assert preact_resnet18_param_count(10) == 11_171_274


def test_preact_resnet18_structure() -> None:
    model = cached("preact_resnet18", 100)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.bias is None
    assert [name for name, _ in model.named_children()] == [
        "conv1",
        "bn1",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "linear",
    ]  # no final BN after layer4
    for layer in (model.layer2, model.layer3, model.layer4):
        proj = layer[0].shortcut
        assert len(proj) == 1 and isinstance(proj[0], nn.Conv2d)  # 1x1 conv, no BN
        assert proj[0].kernel_size == (1, 1) and proj[0].bias is None
    assert len(model.layer1[0].shortcut) == 0 and len(model.layer4[1].shortcut) == 0


def _residual_zero_block(block: PreActBlock) -> PreActBlock:
    """Make the residual branch output zero, so the block output is just shortcut(...)."""
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.bn1.weight.fill_(2.0)
        block.bn1.bias.fill_(-0.5)
        block.bn1.running_mean.fill_(0.3)
        block.bn1.running_var.fill_(4.0)
    return block.eval()


def test_preact_identity_shortcut_uses_preactivated_tensor() -> None:
    torch.manual_seed(0)
    block = _residual_zero_block(PreActBlock(8, 8, stride=1))
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        out = block(x)
        a = F.relu(block.bn1(x))
    # PS-KD: out = F(a) + a. He et al.'s identity mapping would give out = F(a) + x = x here.
    torch.testing.assert_close(out, a)
    assert not torch.allclose(out, x)
    assert (out >= 0).all()  # the residual stream went through the ReLU
    # Changing BN1 (in eval mode: its running stats) changes the output even with F = 0.
    with torch.no_grad():
        block.bn1.running_mean.fill_(-1.0)
        assert not torch.allclose(block(x), out)


def test_preact_projection_shortcut_uses_preactivated_tensor() -> None:
    torch.manual_seed(0)
    block = _residual_zero_block(PreActBlock(4, 8, stride=2))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = block.shortcut[0](F.relu(block.bn1(x)))
        torch.testing.assert_close(block(x), expected)
        assert not torch.allclose(block(x), block.shortcut[0](x))


def test_densenet121_cifar_channels() -> None:
    model = cached("densenet121_cifar", 100)
    assert model.conv1.out_channels == 64 and model.conv1.kernel_size == (3, 3)
    assert model.channels == [256, 512, 1024, 1024]
    assert [
        model.trans1.conv.out_channels,
        model.trans2.conv.out_channels,
        model.trans3.conv.out_channels,
    ] == [128, 256, 512]
    assert model.linear.in_features == 1024 and model.linear.out_features == 100
    assert model.dense1[0].conv1.out_channels == 128 and model.dense1[0].conv2.out_channels == 32
    # the stem conv feeds the first dense layer directly (no BN/ReLU in between)
    assert model.dense1[0].bn1.num_features == 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), FeatureTaps(model, ["pooled", "conv1", "dense1.0:input"]) as t:
        model(x)
        assert t["pooled"].shape == (2, 1024)
        assert t["dense1.0:input"] is t["conv1"]


def test_dense_layer_concatenates_new_first() -> None:
    model = cached("densenet121_cifar", 100)
    layer = model.dense1[0]
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (2, 96, 4, 4)
    torch.testing.assert_close(out[:, 32:], x)


def test_taps_carry_gradients() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", 10).train()
    with FeatureTaps(model, ["stage2", "pooled"]) as taps:
        logits = model(torch.randn(2, 3, 16, 16))
        stage2, pooled = taps["stage2"], taps["pooled"]
    assert stage2.requires_grad and pooled.requires_grad
    (stage2.pow(2).mean() + pooled.sum() + logits.sum()).backward()
    assert model.layer1[0].conv1.weight.grad is not None
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_taps_detach_and_refresh_per_forward() -> None:
    model = build_model("resnet8", 10).eval()
    taps = FeatureTaps(model, ["pooled", "features"], detach=True)
    x1, x2 = torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)
    model(x1)
    assert not taps["pooled"].requires_grad
    first = taps["pooled"]
    # applying the classifier densely after the forward (ZF-LS) must not overwrite "pooled"
    dense = taps["features"].permute(0, 2, 3, 1)
    model.classifier(dense)
    assert taps["pooled"] is first
    model(x2)
    assert taps["pooled"].shape == (3, 64)
    taps.remove()
    model(x1)
    assert taps["pooled"].shape == (3, 64)  # hooks gone: nothing new captured


def test_feature_taps_on_user_sequential() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )
    assert available_taps(model) == {}
    x = torch.randn(2, 1, 5, 5, requires_grad=True)
    with FeatureTaps(model, ["1", "3:input"]) as taps:
        out = model(x)
        relu, flat = taps["1"], taps["3:input"]
    assert relu.shape == (2, 4, 5, 5) and flat.shape == (2, 100)
    torch.testing.assert_close(out, model[3](flat))
    flat.sum().backward()
    assert x.grad is not None


def test_feature_taps_through_dataparallel_wrapper() -> None:
    model = build_model("resnet8", 10).eval()
    wrapped = nn.DataParallel(model)  # no GPU: forwards to model directly
    assert available_taps(wrapped) == available_taps(model)
    with torch.no_grad(), FeatureTaps(wrapped, ["stage3"]) as taps:
        wrapped(torch.randn(2, 3, 8, 8))
        assert taps["stage3"].shape == (2, 64, 2, 2)


class MyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(4, 4)
        self.layer2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(x))


def test_unknown_tap_raises_model_error() -> None:
    with pytest.raises(ModelError) as info:
        FeatureTaps(MyNet(), ["stage2"])
    message = str(info.value)
    assert "MyNet" in message and "'stage2'" in message and "module path" in message
    assert "\n" not in message
    with pytest.raises(ModelError, match="available: stage1, stage2, stage3"):
        FeatureTaps(build_model("resnet8", 10), ["stage4"])
    with pytest.raises(ModelError):
        FeatureTaps(MyNet(), ["layer1:weights"])


def test_uncaptured_tap_raises_model_error() -> None:
    model = MyNet()
    taps = FeatureTaps(model, ["layer1"])
    with pytest.raises(ModelError, match="not been captured"):
        taps["layer1"]
    model(torch.randn(1, 4))
    assert taps["layer1"].shape == (1, 4)
    with pytest.raises(ModelError, match="not recorded"):
        taps["layer2"]
    taps.remove()


def test_unknown_model_suggests_close_match() -> None:
    with pytest.raises(ConfigError, match="preact_resnet18"):
        build_model("preact_resnet19", 10)


def test_unknown_option_names_model_and_accepted_options() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("resnet8", 10, widht=8)
    message = str(info.value)
    assert "'resnet8'" in message and "'widht'" in message and "width" in message
    with pytest.raises(ConfigError, match="accepted options: none"):
        build_model("preact_resnet18", 10, dropout=0.1)


@pytest.mark.parametrize(
    ("num_classes", "in_channels"), [(1, 3), (0, 3), (10, 0), (True, 3), ("10", 3)]
)
def test_bad_sizes_raise_config_error(num_classes: object, in_channels: object) -> None:
    with pytest.raises(ConfigError):
        build_model("resnet8", num_classes, in_channels)  # type: ignore[arg-type]


def test_aliases_build_the_same_model() -> None:
    assert type(build_model("cifar_densenet121", 10)) is type(cached("densenet121_cifar"))
