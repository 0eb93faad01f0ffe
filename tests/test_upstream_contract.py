""" The contract timm's own upstream train.py relies on, followed call by call

Upstream train.py (`--device-modules timm_dbp --model dbp_resnet18 --opt dbpsgd`) imports the plugin by module
name after parsing args, then: create_model, create_optimizer_v2(**optimizer_kwargs(args)), create_scheduler_v2,
ModelEmaV3; per step: autocast forward, (scaler) backward, optimizer step, zero_grad, EMA update, step_update.
It cannot be fetched in tests, so this test makes the same calls in the same order.
"""
import argparse
import importlib
from contextlib import nullcontext
from functools import partial

import pytest
import torch
import torch.nn.functional as F


def _upstream_args(**overrides):
    args = argparse.Namespace(
        opt='dbpsgd', lr=0.05, weight_decay=2e-5, momentum=0.9, opt_eps=None, opt_betas=None, layer_decay=None,
        opt_args={'decor_lr': 1e-3, 'kappa': 0.5}, sched='cosine', epochs=2, warmup_epochs=0, decay_epochs=1,
        cooldown_epochs=0, min_lr=0.0, warmup_lr=1e-5, seed=0,
    )
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


@pytest.mark.parametrize('amp', [None, 'bfloat16', 'float16'])
def test_upstream_train_call_order_learns_R(amp):
    importlib.import_module('timm_dbp')  # --device-modules timm_dbp
    from timm.models import create_model
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.utils import ModelEmaV3, NativeScaler

    import timm_dbp
    torch.manual_seed(0)
    args = _upstream_args()
    model = create_model('dbp_test_resnet', num_classes=4)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    assert timm_dbp.is_dbp_optimizer(optimizer) and optimizer.param_groups[0]['kappa'] == 0.5
    loss_scaler = NativeScaler(device='cpu') if amp == 'float16' else None
    amp_autocast = partial(torch.autocast, device_type='cpu', dtype=getattr(torch, amp)) if amp else nullcontext
    model_ema = ModelEmaV3(model, decay=0.9)
    lr_scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=3)
    R0 = {n: layer.decor_matrix.clone() for n, layer in timm_dbp.decor_layers(model)}
    for step in range(3):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
        with amp_autocast():
            loss = F.cross_entropy(model(x), y)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=1.0, parameters=model.parameters())
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad()
        model_ema.update(model, step=step)
        lr_scheduler.step_update(num_updates=step + 1)
    layers = dict(timm_dbp.decor_layers(model))
    moved = [n for n, R in R0.items() if not torch.equal(R, layers[n].decor_matrix)]
    steps_taken = optimizer.dbp_step  # fp16: GradScaler may skip steps (inf grads), R is then skipped too
    if loss_scaler is None:
        assert steps_taken == 3
    assert all(int(l.decor_updates) + int(l.decor_skipped) == steps_taken for l in layers.values())
    assert len(moved) == (len(R0) if steps_taken else 0)
    ema_layers = dict(timm_dbp.decor_layers(model_ema.module))
    assert set(ema_layers) == set(layers)
    model_ema.module.eval()
    x = torch.randn(2, 3, 32, 32)
    folded = timm_dbp.fold(__import__('copy').deepcopy(model_ema.module)).eval()
    torch.testing.assert_close(folded(x), model_ema.module(x), rtol=1e-4, atol=1e-5)


def test_grad_scaler_skipped_step_skips_R_update():
    import timm
    import timm_dbp
    model = timm.create_model('dbp_test_resnet', num_classes=4)
    optimizer = timm.optim.create_optimizer_v2(model, opt='dbpsgd', lr=0.05)
    scaler = torch.amp.GradScaler('cpu')
    R0 = {n: layer.decor_matrix.clone() for n, layer in timm_dbp.decor_layers(model)}
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    model.fc.weight.grad[0, 0] = float('inf')  # an overflow: GradScaler must skip this step
    scaler.step(optimizer)
    scaler.update()
    assert optimizer.dbp_step == 0
    assert all(torch.equal(R, layer.decor_matrix) for (n, R), (_, layer) in zip(R0.items(), timm_dbp.decor_layers(model)))
    # the next, finite step updates R
    optimizer.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(optimizer)
    assert optimizer.dbp_step == 1
    assert any(not torch.equal(R, layer.decor_matrix) for (n, R), (_, layer) in zip(R0.items(), timm_dbp.decor_layers(model)))
