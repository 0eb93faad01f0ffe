""" BP vs DBP on Fashion-MNIST, side by side

Trains timm's tiny `test_resnet` with plain SGD (BP) and its DBP twin `dbp_test_resnet` with `dbpsgd` (DBP)
from the same initial weights, on the same batches with the same recipe, then prints test accuracy and
training wall-clock of both. Data: the IDX files of Debian's dataset-fashion-mnist (no download).

    python examples/fashion_mnist_bp_vs_dbp.py --epochs 2
"""
import argparse
import copy
import math
import time

import timm
import torch
import torch.nn.functional as F

import timm_dbp
from timm_dbp.data import load_fashion_mnist

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--epochs', type=float, default=2, help='training epochs for each run')
parser.add_argument('-b', '--batch-size', type=int, default=128)
parser.add_argument('--lr', type=float, default=0.05, help='SGD learning rate (nesterov momentum 0.9, cosine decay)')
parser.add_argument('--weight-decay', type=float, default=5e-4)
parser.add_argument('--decor-lr', type=float, default=1e-3, help='DBP learning rate of R')
parser.add_argument('--kappa', type=float, default=0.0, help='0 = decorrelate, 1 = normalise variances')
parser.add_argument('--decor-samples', type=int, default=1024, help='inputs sampled per layer per R update')
parser.add_argument('--evals-per-epoch', type=int, default=2)
parser.add_argument('--train-limit', type=int, default=None, help='use only the first N training images')
parser.add_argument('--seed', type=int, default=0)
parser.add_argument('--data-dir', default=timm_dbp.data.FASHION_MNIST_DIR)


def prepare(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float (N, 1, 32, 32), zero padded to 32 px."""
    x = images.to(device=device, dtype=torch.float32).div_(255).sub_(0.2860).div_(0.3530)
    return F.pad(x[:, None], (2, 2, 2, 2))


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    model.train()
    return 100.0 * correct / len(x)


def train(name, model, opt_name, data, args, device):
    """Train `model` with optimizer `opt_name`; returns [(train seconds, test top-1)] at every evaluation."""
    x_train, y_train, x_test, y_test = data
    opt_kwargs = dict(decor_lr=args.decor_lr, kappa=args.kappa, decor_samples=args.decor_samples) \
        if opt_name.startswith('dbp') else {}
    opt = timm.optim.create_optimizer_v2(
        model, opt=opt_name, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, **opt_kwargs)
    steps_per_epoch = len(x_train) // args.batch_size
    total_steps = int(args.epochs * steps_per_epoch)
    eval_every = max(1, steps_per_epoch // args.evals_per_epoch)
    order = torch.Generator().manual_seed(args.seed)  # the same batches for both runs
    torch.manual_seed(args.seed)
    curve, elapsed, perm = [], 0.0, None
    model.train()
    for step in range(total_steps):
        t0 = time.perf_counter()
        if step % steps_per_epoch == 0:
            perm = torch.randperm(len(x_train), generator=order).to(device)
        idx = perm[(step % steps_per_epoch) * args.batch_size:][:args.batch_size]
        for group in opt.param_groups:
            group['lr'] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        if (step + 1) % eval_every == 0 or step + 1 == total_steps:
            top1 = evaluate(model, x_test, y_test)
            curve.append((elapsed, top1))
            extra = ''
            if hasattr(opt, 'dbp_summary'):
                s = opt.dbp_summary()
                extra = f'  decor_loss {s["decor_loss"]:.4f}  skipped {s["decor_skipped"]}'
            print(f'{name:>3}  epoch {(step + 1) / steps_per_epoch:5.2f}  loss {loss.item():.4f}  '
                  f'test top-1 {top1:6.2f}  train time {elapsed:7.1f}s{extra}', flush=True)
    return curve


def time_to_reach(curve, target):
    return next((t for t, acc in curve if acc >= target), None)


def main():
    args = parser.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    x_train, y_train = load_fashion_mnist('train', args.data_dir)
    x_test, y_test = load_fashion_mnist('test', args.data_dir)
    if args.train_limit:
        x_train, y_train = x_train[:args.train_limit], y_train[:args.train_limit]
    data = (prepare(x_train, device), y_train.to(device), prepare(x_test, device), y_test.to(device))
    print(f'Fashion-MNIST: {len(x_train)} train / {len(x_test)} test images, device {device}, '
          f'torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads')

    torch.manual_seed(args.seed)
    dbp_model = timm.create_model('dbp_test_resnet', in_chans=1, num_classes=10).to(device)
    bp_model = timm.create_model('test_resnet', in_chans=1, num_classes=10).to(device)
    bp_model.load_state_dict(timm_dbp.fold(copy.deepcopy(dbp_model)).state_dict())  # same start (R = I)

    bp = train('BP', bp_model, 'sgd', data, args, device)
    dbp = train('DBP', dbp_model, 'dbpsgd', data, args, device)

    bp_final = bp[-1][1]
    reach = time_to_reach(dbp, bp_final)
    print()
    print(f'{"":4} {"final top-1":>11} {"best top-1":>10} {"train time":>10} {"time to BP final":>16}')
    for name, curve in (('BP', bp), ('DBP', dbp)):
        t = time_to_reach(curve, bp_final)
        print(f'{name:4} {curve[-1][1]:11.2f} {max(a for _, a in curve):10.2f} {curve[-1][0]:9.1f}s '
              f'{(f"{t:.1f}s" if t is not None else "not reached"):>16}')
    if reach is not None:
        print(f'DBP reached BP\'s final accuracy ({bp_final:.2f}%) in {reach / bp[-1][0]:.2f}x BP\'s training time.')
    else:
        print(f'DBP did not reach BP\'s final accuracy ({bp_final:.2f}%) in this run.')


if __name__ == '__main__':
    main()
