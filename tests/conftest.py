import json
import os
from pathlib import Path
from typing import List

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run and keep no example database: a verdict does not
# depend on earlier runs, and nothing is written into the checkout (.hypothesis/).
settings.register_profile('piip', derandomize=True, database=None)
settings.load_profile('piip')

# The shared reference data sits beside the checkout (../shared/reference); PIIP_REFERENCE_DIR overrides.
REFERENCE_DIR = Path(os.environ.get(
    'PIIP_REFERENCE_DIR', Path(__file__).resolve().parents[1].parent / 'shared' / 'reference'))


def reference_files(kind: str) -> List[Path]:
    """All reference json files of a kind; a missing directory is an error, not a skip."""
    folder = REFERENCE_DIR / kind
    files = sorted(folder.glob('*.json'))
    if not files:
        raise FileNotFoundError(f'no reference {kind} in {folder}; set PIIP_REFERENCE_DIR to the shared/reference folder.')
    return files


def load_case(path: Path):
    from safetensors.torch import load_file
    case = json.loads(path.read_text())
    tensors = load_file(str(path.with_suffix('.safetensors')))
    state = {k[len('state_dict.'):]: v for k, v in tensors.items() if k.startswith('state_dict.')}
    if 'output' in tensors:
        outputs = [tensors['output']]
    else:
        outputs = [tensors[f'output.{i}'] for i in range(len(case['output_shapes']))]
    return case, state, tensors['input'], outputs


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
