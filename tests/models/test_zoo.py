"""Zoo: shapes, parameter counts of the reference architectures, checkpoint-style names, FLOP counts."""

import pytest
import torch
from torch import nn

import pyprune
from pyprune import models


def test_small_models_forward_shapes():
    torch.manual_seed(0)
    cases = [
        (models.lenet5(num_classes=7), torch.randn(2, 1, 32, 32), (2, 7)),
        (models.resnet18(num_classes=5), torch.randn(2, 3, 32, 32), (2, 5)),
        (models.mobilenet_v2(num_classes=3), torch.randn(2, 3, 32, 32), (2, 3)),
        (models.vit_small(num_classes=4, img_size=32), torch.randn(2, 3, 32, 32), (2, 4)),
        (models.bert("small", vocab_size=100), torch.randint(0, 100, (2, 9)), (2, 9, 512)),
    ]
    for model, x, shape in cases:
        assert model.eval()(x).shape == shape, type(model).__name__


@pytest.mark.parametrize(
    "build, expected",
    [
        # Parameter counts of torchvision / timm / HuggingFace (BertModel without pooler) for the same shapes.
        (models.resnet18, 11_689_512),
        (models.resnet50, 25_557_032),
        (models.mobilenet_v2, 3_504_872),
        (models.vit_small, 22_050_664),
        (models.vgg16_bn, 138_365_992),
        (lambda: models.bert("base"), 108_891_648),
    ],
)
def test_parameter_counts_match_reference_architectures(build, expected):
    assert pyprune.count_params(build()) == expected


@pytest.mark.parametrize(
    "build, keys",
    [
        (
            models.resnet50,
            [
                "conv1.weight",
                "bn1.running_var",
                "layer1.0.conv3.weight",
                "layer1.0.downsample.0.weight",
                "layer4.2.bn3.bias",
                "fc.weight",
            ],
        ),
        (
            models.mobilenet_v2,
            [
                "features.0.0.weight",
                "features.1.conv.0.0.weight",
                "features.1.conv.1.weight",
                "features.2.conv.1.0.weight",
                "features.18.0.weight",
                "classifier.1.weight",
            ],
        ),
        (models.lenet5, ["conv1.weight", "conv2.bias", "fc1.weight", "fc3.bias"]),
        (
            models.vit_small,
            [
                "cls_token",
                "pos_embed",
                "patch_embed.proj.weight",
                "blocks.0.attn.qkv.weight",
                "blocks.11.mlp.fc2.bias",
                "norm.weight",
                "head.weight",
            ],
        ),
        (
            lambda: models.bert("small", vocab_size=50),
            [
                "embeddings.word_embeddings.weight",
                "embeddings.LayerNorm.weight",
                "encoder.layer.0.attention.self.query.weight",
                "encoder.layer.3.attention.output.LayerNorm.bias",
                "encoder.layer.1.intermediate.dense.weight",
                "encoder.layer.1.output.dense.weight",
            ],
        ),
    ],
)
def test_state_dict_names_follow_common_conventions(build, keys):
    sd = build().state_dict()
    for k in keys:
        assert k in sd, k


def test_vgg_names_and_classifier():
    m = models.vgg16_bn(num_classes=10)
    sd = m.state_dict()
    assert sd["features.0.weight"].shape == (64, 3, 3, 3)
    assert sd["features.1.running_mean"].shape == (64,)
    assert sd["classifier.0.weight"].shape == (4096, 512 * 7 * 7)
    assert sd["classifier.6.weight"].shape == (10, 4096)


def test_bert_attention_mask_changes_only_masked_keys():
    torch.manual_seed(0)
    m = models.bert("small", vocab_size=50).eval()
    ids = torch.randint(0, 50, (1, 6))
    full = m(ids, torch.ones(1, 6))
    masked = m(ids, torch.tensor([[1, 1, 1, 1, 0, 0]]))
    assert not torch.allclose(full, masked)
    with pytest.raises(ValueError, match="config"):
        models.bert("huge")


def test_count_flops_matches_closed_form():
    lin = nn.Linear(16, 8)
    assert pyprune.count_flops(lin, torch.randn(4, 16)) == 2 * 4 * 16 * 8
    conv = nn.Conv2d(3, 5, 3, padding=1)
    assert pyprune.count_flops(conv, torch.randn(2, 3, 8, 8)) == 2 * 2 * 5 * 8 * 8 * 3 * 9
    assert pyprune.count_params(lin) == 16 * 8 + 8
    with pytest.raises(TypeError, match="model"):
        pyprune.count_params("resnet")
