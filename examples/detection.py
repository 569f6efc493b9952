"""PIIP as the backbone of dense heads: torchvision's Mask R-CNN, and a simple segmentation head.

    python examples/detection.py            # one training step on synthetic boxes and masks, then inference

The backbone is ``timm.create_model(..., features_only=True)`` (the PIIP pyramid, strides 4-32)
behind torchvision's FPN; COCO tags (e.g. ``piip_tsb.coco_1120_896_448``) give the original
detectors' backbone weights.
"""
import argparse
import json
from collections import OrderedDict
from typing import Dict, List, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import piip_timm  # noqa: F401  (registers the PIIP models)


class PIIPBackboneWithFPN(nn.Module):
    """A PIIP feature pyramid followed by torchvision's FPN, in the shape torchvision's detectors expect."""

    def __init__(self, model_name: str = 'piip_tsb', pretrained: bool = False, out_channels: int = 256, **kwargs):
        super().__init__()
        self.body = timm.create_model(model_name, pretrained=pretrained, features_only=True, **kwargs)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(images)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def mask_rcnn(model_name: str = 'piip_tsb', num_classes: int = 91, pretrained: bool = False,
              min_size: int = 800, max_size: int = 1333, **kwargs) -> MaskRCNN:
    """torchvision's Mask R-CNN on a PIIP backbone (ImageNet mean/std, the pyramid's 4 levels + pool)."""
    backbone = PIIPBackboneWithFPN(model_name, pretrained=pretrained, **kwargs)
    cfg = backbone.body.pretrained_cfg
    return MaskRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
                    image_mean=list(cfg['mean']), image_std=list(cfg['std']))


class SegmentationHead(nn.Module):
    """Semantic FPN-style head: every pyramid level to `dim` channels, upsampled to stride 4, summed, classified."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, dim: int = 128):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(32, dim), nn.ReLU())
                                      for c in in_channels])
        self.fuse = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(32, dim), nn.ReLU())
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, features: List[torch.Tensor], size) -> torch.Tensor:
        target = features[0].shape[-2:]
        fused = sum(F.interpolate(layer(f), size=target, mode='bilinear', align_corners=False)
                    for layer, f in zip(self.lateral, features))
        return F.interpolate(self.classifier(self.fuse(fused)), size=size, mode='bilinear', align_corners=False)


class PIIPSegmenter(nn.Module):
    def __init__(self, model_name: str = 'piip_tsb', num_classes: int = 21, pretrained: bool = False, **kwargs):
        super().__init__()
        self.backbone = timm.create_model(model_name, pretrained=pretrained, features_only=True, **kwargs)
        self.head = SegmentationHead(self.backbone.feature_info.channels(), num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images), images.shape[-2:])


def synthetic_targets(batch: int, size: int, num_classes: int, generator: torch.Generator) -> List[Dict]:
    """Random boxes with rectangular masks: enough to run a real training step."""
    targets = []
    for _ in range(batch):
        xy = torch.randint(0, size // 2, (2, 2), generator=generator).float()
        wh = torch.randint(size // 8, size // 2, (2, 2), generator=generator).float()
        boxes = torch.cat((xy, xy + wh), dim=1).clamp(max=size - 1)
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        labels = torch.randint(1, num_classes, (2,), generator=generator)
        targets.append(dict(boxes=boxes, labels=labels, masks=masks))
    return targets


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='piip_tsb')
    parser.add_argument('--model-args', default='{}', help='JSON keyword arguments for timm.create_model')
    parser.add_argument('--size', type=int, default=224, help='image side (the detector resizes to it)')
    parser.add_argument('--num-classes', type=int, default=5)
    args = parser.parse_args(argv)
    kwargs = json.loads(args.model_args)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, args.size, args.size, generator=generator) for _ in range(2)]
    targets = synthetic_targets(2, args.size, args.num_classes, generator)

    detector = mask_rcnn(args.model, num_classes=args.num_classes, min_size=args.size, max_size=args.size, **kwargs)
    detector.train()
    losses = detector(images, targets)
    total = sum(losses.values())
    total.backward()
    detector.eval()
    with torch.no_grad():
        predictions = detector(images)

    segmenter = PIIPSegmenter(args.model, num_classes=args.num_classes, **kwargs).train()
    masks = torch.randint(0, args.num_classes, (2, args.size, args.size), generator=generator)
    seg_loss = F.cross_entropy(segmenter(torch.stack(images)), masks)
    seg_loss.backward()

    result = dict(detection_losses={k: float(v) for k, v in losses.items()},
                  predictions=[{k: list(v.shape) for k, v in p.items()} for p in predictions],
                  segmentation_loss=float(seg_loss))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
