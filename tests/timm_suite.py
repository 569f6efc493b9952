"""Run timm's own model test suite (``tests/test_models.py`` of the installed timm release) on piip_* models.

timm's suite is the contract every timm model meets. It is not part of timm's wheel, so this script
fetches the source distribution of the installed version from the package index (cached), copies
``tests/test_models.py`` into a scratch folder and changes only its model lists, the way timm treats
its own ViT-family models:

* ``'piip*'`` joins ``NON_STD_FILTERS`` (token outputs, per-branch lists: timm's "non-standard" models);
* the modules holding piip_timm's ``@register_model`` entry points join ``FEAT_INTER_FILTERS`` (models with
  ``forward_intermediates``);
* a ``conftest.py`` imports ``piip_timm`` so its models are registered before timm's lists are built.

Usage (arguments after the options go to pytest)::

    python tests/timm_suite.py                          # every piip* test but the 6B models and pretrained loads
    python tests/timm_suite.py -k "piip_tsb and default_cfgs_non_std"

Exit code: pytest's (0 only if every selected test passed or was skipped by timm itself).
"""
import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import List, Optional

DEFAULT_SELECTION = 'piip and not h6b and not pretrained'
CACHE = Path(os.environ.get('PIIP_TIMM_SUITE_CACHE', Path.home() / '.cache' / 'piip-timm' / 'timm-tests'))


def timm_test_file(version: str, cache: Path = CACHE) -> Path:
    """``tests/test_models.py`` of timm ``version``, from its source distribution (downloaded once)."""
    target = cache / version / 'test_models.py'
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, '-m', 'pip', 'download', f'timm=={version}', '--no-binary', ':all:', '--no-deps',
             '-q', '-d', tmp], check=True)
        archives = list(Path(tmp).glob('timm-*.tar.gz'))
        if len(archives) != 1:
            raise RuntimeError(f'expected one timm source archive in {tmp}, found {archives}.')
        with tarfile.open(archives[0]) as archive:
            member = archive.getmember(f'timm-{version}/tests/test_models.py')
            data = archive.extractfile(member).read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix('.tmp')
    partial.write_bytes(data)
    partial.replace(target)
    return target


def piip_model_modules() -> List[str]:
    """The module names timm's registry records for the piip_* entry points (what ``list_models(module=)`` matches)."""
    import piip_timm  # noqa: F401  (registers the models)
    from timm.models._registry import _model_to_module
    return sorted({module for name, module in _model_to_module.items() if name.startswith('piip')})


def add_to_list(source: str, list_name: str, entries: List[str]) -> str:
    """Insert ``entries`` at the start of the module-level list ``list_name = [`` in timm's test file."""
    pattern = re.compile(rf'^{list_name} = \[', re.MULTILINE)
    if len(pattern.findall(source)) != 1:
        raise RuntimeError(f'timm\'s test file has no single "{list_name} = [" line; this script needs updating.')
    items = ''.join(f'{entry!r}, ' for entry in entries)
    return pattern.sub(f'{list_name} = [{items}', source)


def prepare(folder: Path, version: str) -> Path:
    """timm's test file with the piip models added to its lists, and a conftest that registers them."""
    source = timm_test_file(version).read_text()
    source = add_to_list(source, 'NON_STD_FILTERS', ['piip*'])
    source = add_to_list(source, 'FEAT_INTER_FILTERS', piip_model_modules())
    (folder / 'test_models.py').write_text(source)
    (folder / 'conftest.py').write_text('import piip_timm  # noqa: F401  (registers the piip_* models)\n')
    return folder / 'test_models.py'


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-k', default=DEFAULT_SELECTION, help=f'pytest selection (default: "{DEFAULT_SELECTION}")')
    args, pytest_args = parser.parse_known_args(argv)
    import timm
    with tempfile.TemporaryDirectory(prefix='timm-suite-') as tmp:
        test_file = prepare(Path(tmp), timm.__version__)
        command = [sys.executable, '-m', 'pytest', str(test_file), '-k', args.k, '-p', 'no:cacheprovider',
                   '--rootdir', tmp, *pytest_args]
        return subprocess.run(command, cwd=tmp).returncode


if __name__ == '__main__':
    sys.exit(main())
