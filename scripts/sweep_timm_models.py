#!/usr/bin/env python3
""" Sweep `timm_dbp.decorrelate()` over timm's architectures (timm.list_models()).

For every architecture: build it without weights, run `timm_dbp.utils.conformance.check_decorrelate` on a batch of
two random images (identical output at R = I, one dbpsgd step reaches the R of every DBP layer, fold exact) and write
one JSON line per model. Resumable: models already in the output are skipped; a model that was started but never
finished (the process died, e.g. out of memory) is recorded as a crash on the next run.

    python scripts/sweep_timm_models.py --out docs/sweep_timm_models.jsonl            # every architecture
    python scripts/sweep_timm_models.py --out /tmp/s.jsonl 'convnext*' 'vit_tiny*'     # some
    python scripts/sweep_timm_models.py --out docs/sweep_timm_models.jsonl --summary docs/SWEEP.md  # + a report
    python scripts/sweep_timm_models.py --shuffle 0 --out ... --summary ...   # random order: a stopped sweep is a sample
    python scripts/sweep_timm_models.py --out ... --redo 'efficientnetv2_rw_m'  # check again (the new row wins)
    python scripts/sweep_timm_models.py --shuffle 0 --threads 1 --shard 0/2 --out a.jsonl &  # 2 processes, each
    python scripts/sweep_timm_models.py --shuffle 0 --threads 1 --shard 1/2 --out b.jsonl    # on a copy of the output

Input: 64 px for models that take any size (the pretrained cfg's size when the plain model cannot run at 64 px or
has a fixed input size). Models over --max-params parameters are skipped (recorded as such).
"""
import argparse
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from typing import Dict, List, Optional

import torch

import timm
from timm.models._registry import _model_to_module  # the family (timm file) of each model

import timm_dbp  # noqa: F401
from timm_dbp.utils.conformance import check_decorrelate, small_input


class _Timeout(BaseException):  # not an Exception: the check's own error handling must not swallow it
    pass


def _alarm(signum, frame):
    raise _Timeout()


def sweep_one(name: str, max_params: int, timeout_s: int) -> Dict:
    row: Dict = dict(model=name, module=_model_to_module.get(name, ''))
    signal.alarm(timeout_s)
    start = time.perf_counter()
    try:
        params = sum(p.numel() for p in timm.create_model(name, device='meta').parameters())
        row['params'] = params
        if params > max_params:
            row['status'] = 'skipped'
            row['problem'] = f'{params / 1e6:.0f}M parameters > --max-params {max_params / 1e6:.0f}M'
            return row
        torch.manual_seed(0)
        model = timm.create_model(name)
        try:
            x = small_input(name, model)
        except Exception as e:
            row['status'] = 'plain model fails'
            row['problem'] = f'{type(e).__name__}: {e}'.strip().splitlines()[0][:200]
            return row
        row['input'] = x.shape[-1]
        result = check_decorrelate(model, x)
        row.update(
            status='ok' if result.ok else 'fail', problem=result.problems(), decor_layers=result.decor_layers,
            identity_max_diff=result.identity_max_diff, fold_rel_diff=result.fold_rel_diff,
            unreached=result.unreached[:20])
        if result.chaotic or result.layer_fold_rel_diff == result.layer_fold_rel_diff:  # measured (not NaN)
            row.update(chaotic=result.chaotic, layer_fold_rel_diff=result.layer_fold_rel_diff,
                       round_off_sensitivity=result.round_off_sensitivity)
    except _Timeout:
        row['status'] = 'timeout'
        row['problem'] = f'over {timeout_s} s'
    except Exception as e:
        row['status'] = 'error'
        row['problem'] = f'{type(e).__name__}: {e}'.strip().splitlines()[0][:300]
    finally:
        signal.alarm(0)
        row['seconds'] = round(time.perf_counter() - start, 2)
    return row


def _read(path: str) -> List[Dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _latest(rows: List[Dict]) -> List[Dict]:
    """The last finished row of each model (a --redo row replaces the earlier one), in first-swept order."""
    latest: Dict[str, Dict] = {}
    for row in rows:
        if row.get('status') != 'started':
            latest[row['model']] = row
    return list(latest.values())


def summarize(rows: List[Dict], total: int, command: str) -> str:
    """A markdown report: what ran, counts by status, and every model that is not ok with its problem."""
    counts = Counter(r['status'] for r in rows)
    lines = [
        '# decorrelate() over timm\'s architectures', '',
        f'Written by `{command}` on {time.strftime("%Y-%m-%d")} (timm {timm.__version__}, torch {torch.__version__}, '
        f'{os.cpu_count()} CPU cores). Per model: identical output at R = I, one dbpsgd step reaching every R, exact '
        'fold (scripts/sweep_timm_models.py). Raw rows: the JSON lines file next to this one.', '',
        f'{len(rows)} of {total} architectures swept: ' + ', '.join(f'{n} {s}' for s, n in counts.most_common()), '']
    chaotic = [r['model'] for r in rows if r.get('chaotic')]
    if chaotic:
        lines += [f'Chaotic at initialisation (float32 round-off alone moves the output by more than the fold '
                  f'tolerance; every DBP layer folds exactly on its own): {", ".join(chaotic)}', '']
    bad = [r for r in rows if r['status'] not in ('ok', 'skipped')]
    if bad:
        lines += ['| model | status | problem |', '|---|---|---|']
        lines += [f'| {r["model"]} | {r["status"]} | {r.get("problem", "").replace("|", "/")} |' for r in bad]
        lines += ['']
    families: Dict[str, Counter] = {}
    for r in rows:
        families.setdefault(r.get('module') or '?', Counter())[r['status']] += 1
    unchecked = sorted(m for m, c in families.items() if not c['ok'])
    lines += [f'Per timm model file: {len(families)} files, {len(families) - len(unchecked)} with at least one '
              f'architecture ok' + (f'; none ok in: {", ".join(unchecked)}' if unchecked else '') + '.', '',
              '| timm model file | ok | skipped (size) | other |', '|---|---:|---:|---:|']
    lines += [f'| {m} | {c["ok"]} | {c["skipped"]} | {sum(c.values()) - c["ok"] - c["skipped"]} |'
              for m, c in sorted(families.items())]
    return '\n'.join(lines) + '\n'


def _append(path: str, row: Dict) -> None:
    """One JSON line, the file opened for it alone: a file replaced meanwhile (an editor, git) still gets it."""
    with open(path, 'a') as f:
        f.write(json.dumps(row) + '\n')


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('patterns', nargs='*', default=['*'], help='timm.list_models filters (default: all)')
    parser.add_argument('--out', required=True, help='JSON lines output (appended; a rerun resumes)')
    parser.add_argument('--summary', default='', help='also write a markdown summary here')
    parser.add_argument('--max-params', type=float, default=100e6, help='skip larger models (default 100M)')
    parser.add_argument('--timeout', type=int, default=300, help='seconds per model (default 300)')
    parser.add_argument('--report-only', action='store_true', help='only write the summary of --out, sweep nothing')
    parser.add_argument('--redo', action='store_true', help='sweep the matching models again even if --out has them')
    parser.add_argument('--shuffle', type=int, default=None, metavar='SEED',
                        help='sweep in a seeded random order (a partial sweep is then a random sample)')
    parser.add_argument('--shard', default='0/1', metavar='K/N',
                        help='sweep only every N-th model (of the --shuffle order), from the K-th (0-based): run N '
                             'processes with --threads 1, each with a copy of --out, then append their new lines')
    parser.add_argument('--threads', type=int, default=os.cpu_count() or 1, help='torch threads (default: all cores)')
    args = parser.parse_args(argv)
    try:
        shard, num_shards = (int(v) for v in args.shard.split('/'))
        assert 0 <= shard < num_shards
    except (ValueError, AssertionError):
        parser.error(f'--shard must be K/N with 0 <= K < N, got {args.shard!r}')
    torch.set_num_threads(max(1, args.threads))
    signal.signal(signal.SIGALRM, _alarm)

    names = timm.list_models(args.patterns, exclude_filters=['dbp_*'])
    if not names:
        parser.error(f'no timm model matches {args.patterns}')
    rows = _read(args.out)
    done = {r['model'] for r in rows if r.get('status') != 'started'}
    started = [r['model'] for r in rows if r.get('status') == 'started' and r['model'] not in done]
    for name in ([] if args.report_only else started):  # the previous run died inside this model
        _append(args.out, dict(model=name, module=_model_to_module.get(name, ''), status='crash',
                               problem='the sweep process ended inside this model (killed, out of memory or crashed)'))
        done.add(name)
    order = list(names)
    if args.shuffle is not None:
        random.Random(args.shuffle).shuffle(order)
    order = order[shard::num_shards]  # the same split whatever is done already
    todo = [] if args.report_only else [n for n in order if args.redo or n not in done]
    for i, name in enumerate(todo):
        _append(args.out, dict(model=name, status='started'))
        row = sweep_one(name, int(args.max_params), args.timeout)
        _append(args.out, row)
        print(f'[{i + 1}/{len(todo)}] {name}: {row["status"]} {row.get("problem", "")}', flush=True)
    rows = [r for r in _latest(_read(args.out)) if r['model'] in set(names)]
    report = summarize(rows, len(names), 'python scripts/sweep_timm_models.py ' + ' '.join(sys.argv[1:]))
    print(report)
    if args.summary:
        with open(args.summary, 'w') as f:
            f.write(report)
    return 0


if __name__ == '__main__':
    sys.exit(main())
