"""The ``piip-timm`` command line."""
import argparse
import sys
from typing import List, Optional

__all__ = ['main']


def _list(args: argparse.Namespace) -> int:
    from .piip import PRETRAINED
    print(f'{"model.tag":44} {"resolution (coarse→fine)":26} weights')
    for variant, tags in PRETRAINED.items():
        for i, (name, tag) in enumerate(tags.items()):
            sizes = '/'.join(str(b.img_size) for b in tag.arch.branches)
            source = f'OpenGVLab/PIIP {tag.file}' if tag.file else \
                'branches: ' + ', '.join(str(s) for s in tag.branch_sources)
            default = ' (default)' if i == 0 else ''
            print(f'{variant + "." + name + default:44} {sizes:26} {tag.notes}; {source}')
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
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError) as e:
        print(f'piip-timm {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
