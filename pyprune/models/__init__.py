"""Built-in model zoo: random init only, no downloads; module names follow torchvision / timm / HuggingFace so
a checkpoint of the same architecture loads with ``load_state_dict``."""

from .bert import BertConfig, BertModel, bert
from .lenet import LeNet5, lenet5
from .mobilenet import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet18, resnet50
from .vgg import VGG, vgg16_bn
from .vit import VisionTransformer, vit_small

__all__ = [
    "BertConfig",
    "BertModel",
    "LeNet5",
    "MobileNetV2",
    "ResNet",
    "VGG",
    "VisionTransformer",
    "bert",
    "lenet5",
    "mobilenet_v2",
    "resnet18",
    "resnet50",
    "vgg16_bn",
    "vit_small",
]
