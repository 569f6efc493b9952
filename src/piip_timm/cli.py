"""The ``piip-timm`` command line."""
import argparse
import sys
from typing import List, Optional

__all__ = ['main']


def _list(args: argparse.Namespace) -> int:
    from .llava import TOWER_TAGS, TOWERS
    from .variants import PRETRAINED

    def row(variant: str, name: str, default: bool, branches, notes: str, source: str) -> None:
        sizes = '/'.join(str(b.img_size) for b in branches)
        print(f'{variant + "." + name + (" (default)" if default else ""):44} {sizes:26} {notes}; {source}')

    def sources(branch_sources) -> str:
        return 'branches: ' + ', '.join(str(s) for s in branch_sources)

    print(f'{"model.tag":44} {"resolution (coarse→fine)":26} weights')
    for variant, tags in PRETRAINED.items():
        for i, (name, tag) in enumerate(tags.items()):
            source = f'OpenGVLab/PIIP {tag.file}' if tag.file else sources(tag.branch_sources)
            row(variant, name, i == 0, tag.arch.branches, tag.notes, source)
    for variant, tags in TOWER_TAGS.items():  # the PIIP-LLaVA vision towers
        for i, (name, tag) in enumerate(tags.items()):
            row(variant, name, i == 0, TOWERS[variant].branches, tag.notes,
                tag.repo if tag.repo else sources(tag.branch_sources))
    return 0


def _model_kwargs(args: argparse.Namespace) -> dict:
    import json
    kwargs = json.loads(args.model_args) if getattr(args, 'model_args', None) else {}
    if getattr(args, 'img_size', None):
        kwargs['img_size'] = args.img_size
    return kwargs


def _check_model_name(name: str) -> None:
    import timm
    if not timm.is_model(name.split('.')[0]) and not name.startswith(('hf-hub:', 'local-dir:')):
        raise ValueError(f'unknown model {name!r}; `piip-timm list` shows the PIIP models.')


def _info(args: argparse.Namespace) -> int:
    import timm
    import torch
    from .flops import count_macs
    _check_model_name(args.model)
    kwargs = _model_kwargs(args)
    with torch.device('meta'):
        model = timm.create_model(args.model, **kwargs)
        dense = timm.create_model(args.model, features_only=True, **kwargs)
    size = model.pretrained_cfg['input_size'][-1] if not args.img_size else args.img_size
    print(f'{args.model}: {len(model.branches)} branches, head {model.head_style}, merge {model.merge_style}, '
          f'{len(model.interactions)} interactions; input {size}x{size}')
    for i, (cfg, branch) in enumerate(zip(model.branch_cfgs, model.branches)):
        params = sum(p.numel() for p in branch.parameters()) / 1e6
        print(f'  branch {i}: {cfg.img_size:>5} px  {cfg.summary()}  {params:8.2f} M')
    total = sum(p.numel() for p in model.parameters()) / 1e6
    interactions = sum(p.numel() for p in model.interactions.parameters()) / 1e6
    macs = count_macs(model, (3, size, size), device=torch.device('meta'))
    print(f'parameters: {total:.2f} M (interactions {interactions:.2f} M); features_only: '
          f'{sum(p.numel() for p in dense.parameters()) / 1e6:.2f} M')
    print(f'multiply-accumulates (paper convention): {macs.paper:.2f} G '
          f'(attention {macs.attention:.2f} G, deformable {macs.deformable:.2f} G)')
    print('feature pyramid (features_only=True): ' + ', '.join(
        f'stride {info["reduction"]} x {info["num_chs"]} ch' for info in dense.feature_info.get_dicts()))
    return 0


def _features(args: argparse.Namespace) -> int:
    from pathlib import Path
    import timm
    import torch
    from PIL import Image, UnidentifiedImageError
    from safetensors.torch import save_file
    from tqdm import tqdm
    _check_model_name(args.model)
    images = [Path(p) for p in args.images]
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f'no such image file(s): {missing[:5]}.')
    model = timm.create_model(args.model, pretrained=args.pretrained, features_only=True, **_model_kwargs(args)).eval()
    size = args.img_size or model.pretrained_cfg['input_size'][-1]
    config = timm.data.resolve_data_config({'input_size': (3, size, size), 'crop_pct': 1.0}, model=model)
    transform = timm.data.create_transform(**config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    strides = model.feature_info.reduction()
    for path in tqdm(images, desc='features', unit='image', disable=args.quiet):
        try:
            image = Image.open(path).convert('RGB')
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f'{path} is not a readable image ({e}).') from e
        with torch.inference_mode():
            features = model(transform(image).unsqueeze(0))
        tensors = {f'stride_{s}': f[0].contiguous() for s, f in zip(strides, features)}
        save_file(tensors, str(out / f'{path.stem}.safetensors'),
                  metadata={'model': args.model, 'image': str(path), 'input_size': str(size)})
    print(f'wrote {len(images)} file(s) to {out} with levels ' + ', '.join(f'stride_{s}' for s in strides))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import statistics
    import timm
    import torch
    from .benchmark import alternate, device, forward_fn, ratio
    _check_model_name(args.model)
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, **_model_kwargs(args)).to(device()).eval()
    size = args.img_size or model.pretrained_cfg['input_size'][-1]
    runs = [forward_fn(model, torch.randn(args.batch, 3, size, size, device=device()))]
    if args.baseline:
        _check_model_name(args.baseline)
        baseline = timm.create_model(args.baseline).to(device()).eval()
        base_size = baseline.pretrained_cfg['input_size'][-1]
        runs.append(forward_fn(baseline, torch.randn(args.batch, 3, base_size, base_size, device=device())))
    times = alternate(runs, args.repeats)
    seconds = statistics.median(times[0])
    print(f'{args.model} at {size}px, batch {args.batch}, {device().type}, {torch.get_num_threads()} threads: '
          f'{seconds * 1000:.1f} ms per batch, {args.batch / seconds:.2f} images/s')
    if args.baseline:
        print(f'{args.baseline} at {base_size}px: {statistics.median(times[1]) * 1000:.1f} ms per batch; '
              f'ratio {args.model}/{args.baseline} = {ratio(times[0], times[1]):.2f} (median of alternated rounds)')
    print('the full comparison (FLOPs, memory, detectors, the deformable op): python benchmarks/run.py')
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .export import convert_checkpoint
    out = convert_checkpoint(args.config, args.task, args.checkpoint, args.out, overwrite=args.overwrite)
    print(f'wrote {out}/model.safetensors and {out}/config.json; load with '
          f"timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='piip-timm', description='PIIP backbones for timm.')
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    p = commands.add_parser('list', help='variants, pretrained tags, resolutions and weight sources')
    p.set_defaults(run=_list)

    p = commands.add_parser('info', help='branches, parameters, FLOPs and feature pyramid of a model')
    p.add_argument('model', help='a model name, e.g. piip_tsb or piip_sbl.coco_1120_672_448')
    p.add_argument('--img-size', type=int, default=None, help='input side (default: the model\'s)')
    p.add_argument('--model-args', default=None, help='JSON keyword arguments for timm.create_model')
    p.set_defaults(run=_info)

    p = commands.add_parser('features', help='multi-scale features of images, saved as .safetensors',
                            description='Run the features_only model on every image and save one .safetensors '
                                        'file per image with a tensor per pyramid level (stride_4 ... stride_32).')
    p.add_argument('model', help='a model name, e.g. piip_tsb.coco_1120_896_448')
    p.add_argument('images', nargs='+', help='image files')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--img-size', type=int, default=None, help='input side (default: the model\'s)')
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True,
                   help='load the tag\'s weights (default) or keep random init')
    p.add_argument('--model-args', default=None, help='JSON keyword arguments for timm.create_model')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    p.set_defaults(run=_features)

    p = commands.add_parser('bench', help='latency and throughput of a model (optionally against a baseline)',
                            description='Alternated timing of a model (and a baseline); the full report with FLOPs, '
                                        'memory and the paper\'s comparisons is python benchmarks/run.py.')
    p.add_argument('model')
    p.add_argument('--baseline', default=None, help='a timm model to time against, e.g. deit_base_patch16_224')
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--model-args', default=None, help='JSON keyword arguments for timm.create_model')
    p.set_defaults(run=_bench)

    p = commands.add_parser(
        'convert', help='original checkpoint + config -> model.safetensors + timm config.json',
        description='Convert an original PIIP checkpoint (loaded with weights_only=True, strictly) into a '
                    'folder for timm.create_model("local-dir:FOLDER") or timm.models.push_to_hub.')
    p.add_argument('config', help="original config file (.py, read without running it) or .json backbone dict")
    p.add_argument('checkpoint', help='original checkpoint (.pth/.bin or .safetensors)')
    p.add_argument('--task', choices=('cls', 'det'), required=True,
                   help='cls: classification/configs; det: mmdetection/configs/piip')
    p.add_argument('--out', required=True, help='output folder (must not exist unless --overwrite)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    p.set_defaults(run=_convert)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as e:  # OSError: missing files, existing outputs, Hub, disk
        print(f'piip-timm {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
