"""Fine-tune a PIIP classifier with timm's factories, on one process or many.

    python examples/finetune.py                                  # scikit-learn's digits, on CPU
    python examples/finetune.py --data-dir /path/to/imagefolder  # train/ and val/ subfolders
    torchrun --nproc_per_node 2 examples/finetune.py --epochs 1  # DDP (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node 8 examples/finetune.py --model piip_lh6b --fsdp  # FSDP2 for the large variants

timm builds the data pipeline, the optimizer (with layer-wise LR decay through the model's
``group_matcher``) and the scheduler; AMP (bf16 on CPU, bf16/fp16 on GPU), gradient
checkpointing, drop-path and an EMA are options. Checkpoints are safetensors files that resume
the run (model, EMA, optimizer, scheduler position).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

import piip_timm  # noqa: F401  (registers the PIIP models)


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's 8x8 handwritten digits (1797 real scans) as RGB PIL images, for a dataset-free run."""

    def __init__(self, train: bool, size: int = 64):
        from PIL import Image
        from sklearn.datasets import load_digits
        digits = load_digits()
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(len(digits.target), generator=generator).tolist()
        cut = int(0.8 * len(order))
        self.indices = order[:cut] if train else order[cut:]
        images = (digits.images * (255.0 / 16.0)).astype('uint8')
        self.images = [Image.fromarray(images[i]).resize((size, size), Image.BILINEAR).convert('RGB')
                       for i in self.indices]
        self.targets = [int(digits.target[i]) for i in self.indices]
        self.transform = None  # set by timm's create_loader

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


def setup_distributed() -> Tuple[int, int, torch.device]:
    """rank, world size and device; torchrun sets the environment."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get('LOCAL_RANK', 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device('cuda', local)
    return rank, world, torch.device('cpu')


def build_model(args, device: torch.device, num_classes: int) -> torch.nn.Module:
    kwargs = dict(num_classes=num_classes, drop_path_rate=args.drop_path, **json.loads(args.model_args))
    if args.img_size:
        kwargs['img_size'] = args.img_size
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except ConnectionError as e:  # offline: say so and start from random weights
        print(f'pretrained weights unavailable ({e}); training from random initialisation')
        model = timm.create_model(args.model, pretrained=False, **kwargs)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.to(device)


def wrap_distributed(model: torch.nn.Module, args, world: int, device: torch.device) -> torch.nn.Module:
    if world == 1:
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for branch in model.branches:  # shard layer by layer (any branch kind), then the rest
            for index in range(branch.num_layers):
                layer = branch.layer(index)
                if any(True for _ in layer.parameters()):  # ConvNeXt's first downsampling is an Identity
                    fully_shard(layer)
        for step in model.interactions:
            for unit in step:
                fully_shard(unit)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)


def flat_state(prefix: str, state: Dict) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """An optimizer state dict as safetensors tensors + JSON-able rest."""
    tensors, rest = {}, {'param_groups': state['param_groups'], 'scalars': {}}
    for index, entry in state['state'].items():
        for name, value in entry.items():
            key = f'{prefix}.{index}.{name}'
            if torch.is_tensor(value):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                rest['scalars'][key] = value
    return tensors, rest


def unflat_state(prefix: str, tensors: Dict[str, torch.Tensor], rest: Dict) -> Dict:
    state: Dict[int, Dict] = {}
    for key, value in list(tensors.items()) + list(rest['scalars'].items()):
        if key.startswith(prefix + '.'):
            _, index, name = key.split('.', 2)
            state.setdefault(int(index), {})[name] = value
    return {'state': state, 'param_groups': rest['param_groups']}


def full_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Model weights as plain CPU tensors (unwrapping DDP, gathering FSDP2 shards)."""
    model = getattr(model, 'module', model)
    state = {}
    for key, value in model.state_dict().items():
        value = value.full_tensor() if hasattr(value, 'full_tensor') else value
        state[key] = value.detach().cpu().contiguous()
    return state


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the full weights, to check that distributed replicas agree."""
    import hashlib
    digest = hashlib.sha256()
    for key, value in sorted(full_state_dict(model).items()):
        digest.update(key.encode())
        digest.update(value.float().numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, model, optimizer, ema: Optional[ModelEmaV3], epoch: int, step: int, fsdp: bool) -> None:
    tensors = {f'model.{k}': v for k, v in full_state_dict(model).items()}
    meta = {'epoch': epoch, 'step': step}
    if ema is not None:
        tensors.update({f'ema.{k}': v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()})
    if not fsdp:  # sharded optimizer state stays with torch.distributed.checkpoint; see the README
        optim_tensors, rest = flat_state('optim', optimizer.state_dict())
        tensors.update(optim_tensors)
        meta['optim'] = rest
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = path.with_suffix('.tmp')
        save_file(tensors, str(tmp), metadata={'piip_finetune': json.dumps(meta)})
        os.replace(tmp, path)


def load_checkpoint(path: Path, model, ema: Optional[ModelEmaV3]) -> Tuple[int, int, Optional[Dict]]:
    """Model and EMA weights into the (unwrapped) model; returns epoch, step and the optimizer state, if saved."""
    from safetensors import safe_open
    tensors = load_file(str(path))
    with safe_open(str(path), 'pt') as f:
        meta = json.loads(f.metadata()['piip_finetune'])
    target = getattr(model, 'module', model)
    target.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith('model.')})
    if ema is not None and any(k.startswith('ema.') for k in tensors):
        ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith('ema.')})
    optim = unflat_state('optim', tensors, meta['optim']) if 'optim' in meta else None
    return meta['epoch'], meta['step'], optim


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype) -> float:
    model.eval()
    correct = total = 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        correct += (logits.argmax(-1) == targets).sum().item()
        total += targets.numel()
    if dist.is_initialized():
        counts = torch.tensor([correct, total], device=device)
        dist.all_reduce(counts)
        correct, total = counts.tolist()
    return correct / max(total, 1)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='piip_tsb')
    parser.add_argument('--model-args', default='{}', help='JSON keyword arguments for timm.create_model')
    parser.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument('--data-dir', default=None, help='ImageFolder root with train/ and val/ (default: digits)')
    parser.add_argument('--img-size', type=int, default=96)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--epochs', type=int, default=1)
    parser.add_argument('--max-steps', type=int, default=None, help='stop after this many steps')
    parser.add_argument('--lr', type=float, default=5e-4)
    parser.add_argument('--weight-decay', type=float, default=0.05)
    parser.add_argument('--layer-decay', type=float, default=0.75, help='layer-wise LR decay (group_matcher)')
    parser.add_argument('--warmup-epochs', type=float, default=0.0)
    parser.add_argument('--drop-path', type=float, default=0.1)
    parser.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default='bf16')
    parser.add_argument('--grad-checkpointing', action='store_true')
    parser.add_argument('--ema', type=float, default=None, help='EMA decay, e.g. 0.999')
    parser.add_argument('--fsdp', action='store_true', help='FSDP2 (fully_shard) instead of DDP under torchrun')
    parser.add_argument('--output', default='finetune_output', help='checkpoint folder')
    parser.add_argument('--resume', default=None, help='a checkpoint .safetensors to resume from')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workers', type=int, default=0)
    args = parser.parse_args(argv)

    rank, world, device = setup_distributed()
    torch.manual_seed(args.seed)  # the same initial weights on every rank (FSDP2 does not broadcast them)
    amp_dtype = None if args.amp == 'none' else (torch.float16 if args.amp == 'fp16' else torch.bfloat16)
    if amp_dtype is torch.float16 and device.type != 'cuda':
        raise ValueError('fp16 autocast needs a GPU; use --amp bf16 on CPU.')

    if args.data_dir:
        train_set = create_dataset('', root=args.data_dir, split='train', is_training=True)
        val_set = create_dataset('', root=args.data_dir, split='val')
        num_classes = len(set(train_set.reader.class_to_idx.values()))
    else:
        train_set, val_set, num_classes = DigitsDataset(True, args.img_size), DigitsDataset(False, args.img_size), 10
    model = build_model(args, device, num_classes)
    timm.utils.random_seed(args.seed, rank)  # per-rank augmentation streams (timm's transforms draw from random)
    data_config = resolve_data_config({'input_size': (3, args.img_size, args.img_size)}, model=model)
    common = dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                  num_workers=args.workers, distributed=world > 1, use_prefetcher=False, device=device,
                  persistent_workers=False)
    train_loader = create_loader(train_set, batch_size=args.batch_size, is_training=True, hflip=0.0,
                                 interpolation='bicubic', **common)
    val_loader = create_loader(val_set, batch_size=args.batch_size, crop_pct=1.0, **common)

    ema = ModelEmaV3(model, decay=args.ema) if args.ema else None
    scaler = torch.amp.GradScaler('cuda') if amp_dtype is torch.float16 else None
    start_epoch, step, optim_state = 0, 0, None
    if args.resume:
        start_epoch, step, optim_state = load_checkpoint(Path(args.resume), model, ema)
    initial_digest = weights_digest(model)  # before any update, to show that training changed the weights
    model = wrap_distributed(model, args, world, device)
    # The optimizer comes after wrapping: FSDP2's fully_shard replaces the parameters by sharded ones, so an
    # optimizer built before it would hold tensors that never get a gradient (and never change).
    optimizer = create_optimizer_v2(getattr(model, 'module', model), 'adamw', lr=args.lr,
                                    weight_decay=args.weight_decay, layer_decay=args.layer_decay)
    if optim_state is not None:
        optimizer.load_state_dict(optim_state)
    scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                                       updates_per_epoch=len(train_loader), step_on_epochs=False)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    losses = []
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        if hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        progress = tqdm(train_loader, desc=f'epoch {epoch}', disable=rank != 0)
        for images, targets in progress:
            images, targets = images.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(getattr(model, 'module', model), step=step)
            losses.append(loss.item())
            progress.set_postfix(loss=f'{loss.item():.3f}', lr=f'{optimizer.param_groups[-1]["lr"]:.2e}')
            if args.max_steps and step >= args.max_steps:
                break
        else:
            save_checkpoint(output / 'last.safetensors', model, optimizer, ema, epoch + 1, step, args.fsdp)
            continue
        # Stopped inside the epoch: a resumed run starts this epoch again (the step count carries on).
        save_checkpoint(output / 'last.safetensors', model, optimizer, ema, epoch, step, args.fsdp)
        break
    accuracy = evaluate(model, val_loader, device, amp_dtype)
    ema_accuracy = evaluate(ema.module, val_loader, device, amp_dtype) if ema is not None else None
    window = max(1, min(5, len(losses) // 2))
    result = dict(steps=step, loss_start=sum(losses[:window]) / window if losses else None,
                  loss_end=sum(losses[-window:]) / window if losses else None,
                  accuracy=accuracy, ema_accuracy=ema_accuracy, seconds=time.time() - start, world_size=world,
                  rank=rank, initial_weights_sha256=initial_digest, weights_sha256=weights_digest(model))
    # One line per rank (replicas must agree on weights_sha256), written at once so ranks do not interleave.
    sys.stdout.write(json.dumps(result) + '\n')
    sys.stdout.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == '__main__':
    main()
