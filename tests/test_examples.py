"""The examples, run as a user runs them, on tiny settings."""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from helpers import tiny_branches
from piip_timm.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
TINY_TSB = json.dumps(dict(branches=[asdict(b) for b in tiny_branches(VARIANTS['piip_tsb'].branches)],
                           interaction=dict(num_heads=4)))
# The finest branch a small ConvNeXt (a hybrid like PIIP-VT-VS-CT): its layers are blocks and downsamplings.
TINY_HYBRID = json.dumps(dict(
    branches=[asdict(b) for b in tiny_branches(VARIANTS['piip_tsb'].branches)[:2]] + [dict(
        kind='convnext', img_size=128, dims=[32, 32, 32, 32], depths=[1, 1, 1, 1], block_ranges=[[0, 2], [3, 6]])],
    interaction=dict(num_heads=4), head='merged', merge='conv'))


def run(args, timeout=900, env=None):
    result = subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE='1', **(env or {})))
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]


def test_finetune_on_digits_lowers_the_loss_and_resumes(tmp_path):
    common = [str(ROOT / 'examples' / 'finetune.py'), '--model', 'piip_tsb', '--model-args', TINY_TSB,
              '--no-pretrained', '--img-size', '64', '--batch-size', '32', '--lr', '2e-3', '--layer-decay', '0.9',
              '--drop-path', '0.05', '--ema', '0.9', '--grad-checkpointing', '--amp', 'bf16',
              '--epochs', '2', '--output', str(tmp_path)]
    first = run(common + ['--max-steps', '60'])[0]
    assert first['steps'] == 60
    assert first['loss_end'] < first['loss_start'] - 0.12, first  # from ~2.30 (chance: ln 10)
    assert first['accuracy'] > 0.2 and first['ema_accuracy'] is not None  # chance is 0.10
    assert (tmp_path / 'last.safetensors').is_file()
    resumed = run(common + ['--max-steps', '70', '--resume', str(tmp_path / 'last.safetensors')])[0]
    assert resumed['steps'] == 70  # continued from step 60
    assert resumed['loss_start'] < first['loss_start'] - 0.08


@pytest.mark.parametrize('engine, model_args', [('ddp', TINY_TSB), ('fsdp', TINY_TSB), ('fsdp', TINY_HYBRID)],
                         ids=['ddp', 'fsdp', 'fsdp-convnext'])
def test_two_cpu_processes_with_gloo_keep_replicas_identical(tmp_path, engine, model_args):
    # --standalone: the rendezvous takes a free port (a fixed one fails when something else holds it)
    results = run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                   str(ROOT / 'examples' / 'finetune.py'), '--model', 'piip_tsb', '--model-args', model_args,
                   '--no-pretrained', '--img-size', '64', '--batch-size', '16', '--max-steps', '4', '--amp', 'none',
                   '--output', str(tmp_path)] + (['--fsdp'] if engine == 'fsdp' else []), env={'OMP_NUM_THREADS': '1'})
    assert sorted(r['rank'] for r in results) == [0, 1]
    assert all(r['world_size'] == 2 and r['steps'] == 4 for r in results)
    assert results[0]['weights_sha256'] == results[1]['weights_sha256']
    assert results[0]['initial_weights_sha256'] == results[1]['initial_weights_sha256']
    assert results[0]['weights_sha256'] != results[0]['initial_weights_sha256']  # the steps did update them


def test_detection_and_segmentation_example():
    result = run([str(ROOT / 'examples' / 'detection.py'), '--model-args', TINY_TSB, '--size', '128'])[0]
    losses = result['detection_losses']
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'}
    assert all(v == v and v >= 0 for v in losses.values())  # finite, non-negative
    assert len(result['predictions']) == 2
    assert {'boxes', 'labels', 'scores', 'masks'} <= set(result['predictions'][0])
    assert result['segmentation_loss'] > 0


def tiny_llava_args() -> str:
    from piip_timm.clip_branch import CLIPBranchCfg
    branches = [CLIPBranchCfg(img_size=32, embed_dim=64, depth=2, num_heads=2, block_ranges=((0, 0), (1, 1)),
                              pos_embed_grid=2),
                CLIPBranchCfg(img_size=64, embed_dim=32, depth=2, num_heads=2, block_ranges=((0, 0), (1, 1)),
                              pos_embed_grid=4)]
    return json.dumps(dict(branches=[asdict(b) for b in branches], interaction=dict(num_heads=4)))


@pytest.mark.parametrize('offline_fallback', [False, True])
def test_llava_tokens_example_gives_the_language_model_tokens(tmp_path, offline_fallback):
    """Offline on random weights: 64 px input, maps of 2x2 (32 px / 16) and 4x4, 16 tokens of Vicuna-7B's width.
    Without --no-pretrained and with an empty cache it must say that it fell back to random weights."""
    args = [str(ROOT / 'examples' / 'llava_tokens.py'), '--model', 'piip_llava_clip_bl_512_256.llava_7b',
            '--model-args', tiny_llava_args(), '--threads', '1']
    result = run(args + ([] if offline_fallback else ['--no-pretrained']), env={'HF_HOME': str(tmp_path)})[0]
    assert result['input'] == [1, 3, 64, 64]
    assert result['maps'] == [[1, 64, 2, 2], [1, 32, 4, 4]]
    assert result['tokens'] == [1, 16, 4096] and result['finite']
    assert result['projector_params'] == 2 * (4096 * 4096 + 4096) + (64 + 32) * 4096 + 4 * 4096 + 2 * 4096
    expected = 'pretrained weights unavailable' if offline_fallback else '--no-pretrained'
    assert 'RANDOM INITIALISATION' in result['weights'] and expected in result['weights']
