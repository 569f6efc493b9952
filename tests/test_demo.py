"""The README's demo runs offline and says whether its weights are pretrained."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_offline_and_says_the_weights_are_random(tmp_path):
    # An empty HF cache of its own (the user's might hold the weights) and no other HF_* settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE'))}
    env.update(HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf_home'))
    result = subprocess.run(
        [sys.executable, str(ROOT / 'examples' / 'demo.py'), '--img-size', '224', '--threads', '2'],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # the fallback is for the Hub being unreachable, and says so; any other failure is a bug, not a fallback
    assert ('weights      : RANDOM INITIALISATION (pretrained weights unavailable: HubUnavailableError: '
            'OpenGVLab/PIIP/classification/piip_3branch_tsb_368-192-128_cls_token_deit1.pth is not in the '
            'Hugging Face cache and HF_HUB_OFFLINE is set') in out
    assert 'chelsea.jpg -> input (1, 3, 224, 224)' in out
    strides = [line.split()[3] for line in out.splitlines() if line.startswith('feature')]
    assert strides == ['4', '8', '16', '32']
    assert '(1, 768, 56, 56)' in out and '(1, 768, 7, 7)' in out
    assert 'parameters   :' in out and 'forward time :' in out
