"""An image in, the image tokens a PIIP-LLaVA language model receives out: vision tower + projector, on CPU.

    python examples/llava_tokens.py                                   # PIIP-LLaVA CLIP-BL 512-256 (7B) tower
    python examples/llava_tokens.py --model piip_llava_convnext_b_clip_l_1024_336.llava_7b --image my.jpg

The tower gives two maps (CLIP-L on the small image, CLIP-B or ConvNeXt on the input image); the
``separate_2branch_v1`` projector brings both to the second map's grid and sums their MLPs: H2*W2 tokens
of the language model's width. It tries the released weights first and says plainly when it fell back to
random initialisation (e.g. offline); ``--model-args`` (JSON) overrides the architecture, e.g. smaller branches.
"""
import argparse
import json
import time
from importlib import resources

import timm
import torch
from PIL import Image

import piip_timm  # noqa: F401  (registers the PIIP models with timm)
from piip_timm.layers.llava_projector import BranchMapProjector
from piip_timm.llava import TOWER_TAGS, create_llava_projector, create_llava_transform


def build(name: str, model_args: dict, out_dim: int, released: bool, want_pretrained: bool):
    """Tower, projector and a sentence saying where their weights came from."""
    if want_pretrained:
        try:
            tower = timm.create_model(name, pretrained=True, **model_args)
            if released:
                return tower, create_llava_projector(name, pretrained=True), f'PRETRAINED ({name})'
            return tower, BranchMapProjector(tower.embed_dims, out_dim), \
                f'PRETRAINED BRANCHES ({name}); interactions and projector freshly initialised'
        except ConnectionError as e:  # offline or Hub unreachable (piip_timm's HubUnavailableError); bugs propagate
            reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
            note = f'RANDOM INITIALISATION (pretrained weights unavailable: {reason})'
    else:
        note = 'RANDOM INITIALISATION (--no-pretrained)'
    tower = timm.create_model(name, pretrained=False, **model_args)
    return tower, BranchMapProjector(tower.embed_dims, out_dim), note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='piip_llava_clip_bl_512_256.llava_7b',
                        help='a PIIP-LLaVA tower tag (default: piip_llava_clip_bl_512_256.llava_7b)')
    parser.add_argument('--image', default=None, help='an image file (default: the bundled photograph)')
    parser.add_argument('--model-args', default='{}', help='JSON keyword arguments for timm.create_model')
    parser.add_argument('--no-pretrained', action='store_true', help='skip the attempt to load the released weights')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variant, _, tag = args.model.partition('.')
    if variant not in TOWER_TAGS:
        parser.error(f'{variant} is not a PIIP-LLaVA tower; choose one of {sorted(TOWER_TAGS)}.')
    weights_tag = TOWER_TAGS[variant].get(tag or next(iter(TOWER_TAGS[variant])))
    released = weights_tag is not None and weights_tag.repo is not None
    out_dim = weights_tag.llm_width if released else 4096  # Vicuna-7B's width for other tags

    start = time.perf_counter()
    tower, projector, weights = build(args.model, json.loads(args.model_args), out_dim, released,
                                      not args.no_pretrained)
    tower.eval(), projector.eval()
    build_time = time.perf_counter() - start

    image_path = args.image or str(resources.files('piip_timm') / 'assets' / 'chelsea.jpg')
    image = Image.open(image_path).convert('RGB')
    x = create_llava_transform(tower)(image).unsqueeze(0)
    with torch.inference_mode():
        start = time.perf_counter()
        maps = tower.forward_features(x)
        tower_time = time.perf_counter() - start
        start = time.perf_counter()
        tokens = projector(*maps)
        projector_time = time.perf_counter() - start

    result = dict(
        model=args.model, weights=weights, image=image_path, image_size=list(image.size), input=list(x.shape),
        maps=[list(m.shape) for m in maps], tokens=list(tokens.shape),
        tower_params=sum(p.numel() for p in tower.parameters()),
        projector_params=sum(p.numel() for p in projector.parameters()),
        build_s=round(build_time, 3), tower_s=round(tower_time, 3), projector_s=round(projector_time, 3),
        threads=torch.get_num_threads(), finite=bool(torch.isfinite(tokens).all()))
    print(f'model     : {args.model}  ({weights})')
    print(f'image     : {image_path} {image.size[0]}x{image.size[1]} -> input {tuple(x.shape)}')
    print(f'tower     : maps {[tuple(m.shape) for m in maps]}  {result["tower_params"] / 1e6:.1f} M params, '
          f'{tower_time:.2f} s')
    print(f'projector : tokens {tuple(tokens.shape)}  {result["projector_params"] / 1e6:.1f} M params, '
          f'{projector_time:.3f} s')
    print(json.dumps(result))


if __name__ == '__main__':
    main()
