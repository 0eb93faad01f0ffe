""" DBP under DistributedDataParallel: 2 gloo processes on CPU, different data per rank """
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import timm
    import timm_dbp  # noqa: F401 registers the models and optimizers
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on every rank
    model = timm.create_model('dbp_test_resnet', num_classes=4)
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    opt = timm.optim.create_optimizer_v2(model, opt='dbpsgd', lr=0.05, decor_lr=1e-2, decor_samples=64)
    torch.manual_seed(100 + rank)  # different data and different patch samples per rank
    assert opt.warm_up_decorrelation(model, [torch.randn(4, 3, 32, 32) for _ in range(2)]) == 2  # R learned first
    for _ in range(3):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    # parameters and R; BatchNorm running stats are rank-local without buffer broadcast (timm's distribute_bn)
    state = dict(model.named_parameters())
    state.update({k: v for k, v in model.state_dict().items() if k.endswith('decor_matrix')})
    torch.save({k: v.detach() for k, v in state.items()}, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason='torch.distributed not available')
def test_ddp_ranks_hold_identical_R_and_weights(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    decor_keys = [k for k in states[0] if k.endswith('decor_matrix')]
    assert decor_keys
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), f'{key} differs between ranks'
    moved = [k for k in decor_keys if not torch.equal(states[0][k], torch.eye(states[0][k].shape[0]))]
    assert len(moved) == len(decor_keys), 'every R must have moved from the identity'


def test_train_ddp_wrapper_never_broadcasts_R(tmp_path):
    import timm
    import train
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous', rank=0, world_size=1)
    try:
        model = timm.create_model('dbp_test_resnet', num_classes=4)
        ddp = train.wrap_ddp(model, torch.device('cpu'))
        ignored = set(model._ddp_params_and_buffers_to_ignore)
        decor = {n for n, _ in model.named_buffers() if '.decor_' in n}
        assert decor and decor <= ignored
        assert not any('running_mean' in n for n in ignored)  # BatchNorm stats are still synced
        broadcast = {n for n, _ in ddp.module.named_buffers() if n not in ignored}
        assert broadcast and not any('decor' in n for n in broadcast)
    finally:
        dist.destroy_process_group()
