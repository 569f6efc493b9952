"""Multi-scale features of a real photograph from a PIIP backbone, on CPU, offline.

    python examples/demo.py                      # PIIP-TSB on the bundled photo of a cat
    python examples/demo.py --model piip_sbl --image my.jpg --img-size 448

It tries the pretrained weights first and says plainly when it had to fall back to
random initialisation (for example on a machine without access to the Hugging Face Hub).
"""
import argparse
import time
from importlib import resources

import timm
import torch
from PIL import Image

import piip_timm  # noqa: F401  (registers the PIIP models with timm)


def load_image(path: str, size: int) -> torch.Tensor:
    """Resize the short side to ``size``, centre-crop, normalise with the model's ImageNet statistics."""
    image = Image.open(path).convert('RGB')
    config = timm.data.resolve_data_config({'input_size': (3, size, size), 'crop_pct': 1.0})
    transform = timm.data.create_transform(**config)
    return transform(image).unsqueeze(0)


def build(model_name: str, img_size: int, want_pretrained: bool):
    """The features_only model, and a sentence saying where its weights came from."""
    kwargs = dict(features_only=True, img_size=img_size)
    if want_pretrained:
        try:
            model = timm.create_model(model_name, pretrained=True, **kwargs)
            tag = model.pretrained_cfg.get('tag')
            note = model.pretrained_cfg.get('notes', '')
            fresh = '; the branch merge and pyramid are freshly initialised' if 'classifier' in note else ''
            return model, f'PRETRAINED ({model_name}.{tag}: {note}{fresh})'
        except ConnectionError as e:  # offline or Hub unreachable (piip_timm's HubUnavailableError); bugs propagate
            reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
            return timm.create_model(model_name, pretrained=False, **kwargs), \
                f'RANDOM INITIALISATION (pretrained weights unavailable: {reason})'
    return timm.create_model(model_name, pretrained=False, **kwargs), 'RANDOM INITIALISATION (--no-pretrained)'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='piip_tsb', help='a registered PIIP model (default: piip_tsb)')
    parser.add_argument('--image', default=None, help='an image file (default: the bundled photograph)')
    parser.add_argument('--img-size', type=int, default=None,
                        help='input side in pixels (default: the model\'s default resolution)')
    parser.add_argument('--no-pretrained', action='store_true', help='skip the attempt to load pretrained weights')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    image_path = args.image or str(resources.files('piip_timm') / 'assets' / 'chelsea.jpg')
    default_size = timm.models.get_pretrained_cfg(args.model).input_size[-1]
    size = args.img_size or default_size

    start = time.perf_counter()
    model, weights = build(args.model, size, not args.no_pretrained)
    model.eval()
    build_time = time.perf_counter() - start
    inner = model.model if hasattr(model, 'model') else model
    branch_sizes = [round(size * r) for r in inner.image_ratios]

    x = load_image(image_path, size)
    with torch.inference_mode():
        model(x)  # warm-up
        start = time.perf_counter()
        features = model(x)
        forward_time = time.perf_counter() - start

    print(f'model        : {args.model} ({len(inner.branches)} branches, images {branch_sizes} px, '
          f'widths {list(inner.embed_dims)})')
    print(f'weights      : {weights}')
    print(f'parameters   : {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M')
    print(f'image        : {image_path} -> input {tuple(x.shape)}')
    for tensor, info in zip(features, model.feature_info.get_dicts()):
        print(f'feature      : stride {info["reduction"]:>2}  {tuple(tensor.shape)}  '
              f'mean {tensor.mean():+.4f}  std {tensor.std():.4f}')
    print(f'build time   : {build_time:.2f} s')
    print(f'forward time : {forward_time:.3f} s (batch 1, {torch.get_num_threads()} threads, '
          f'{"cuda" if x.is_cuda else "cpu"})')


if __name__ == '__main__':
    main()
