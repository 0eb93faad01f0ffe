""" Resident memory of this process, from /proc/self/status (Linux), for the CPU memory benchmarks """


def rss_bytes(field: str = 'VmRSS') -> int:
    """Resident size now (VmRSS) or this process's own peak (VmHWM). Not getrusage's ru_maxrss: a child started by
    fork + exec inherits its parent's maximum there."""
    with open('/proc/self/status') as f:
        line = next(line for line in f if line.startswith(field + ':'))
    return int(line.split()[1]) * 1024  # kB
