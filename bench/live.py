"""Live data: follow() delivery delay across processes, and what listeners cost a dispatch.

    python bench/live.py            # 200 followed events, 5,000 dispatches per rate
    python bench/live.py --quick    # 50 followed events, 1,000 dispatches per rate

- Delay: a writer process dispatches an event every 20 ms (durability=normal)
  with meta {"t": time.time()} taken just before dispatch(); this process's
  store.follow() yields it, and delay = time.time() then minus meta["t"] (so it
  includes the writer's commit). Targets are ours, from follow()'s documented
  polling, which backs off to 20 ms when idle: median <= 20 ms, p99 <= 50 ms.
- Rate: dispatch() of single events, durability=normal, on a fresh file with
  0, 1 or 10 trivial subscribers, or with 0 subscribers while a follower
  process tails the same file; best of --repeat interleaved rounds, each as a
  ratio to the 0-subscriber rate.
"""

import argparse
import itertools
import math
import statistics
import subprocess
import sys
import time

from _common import bench, fluxlite, interleave, ms, parser, record, run, timed


def child(*args):
    return subprocess.Popen([sys.executable, __file__, *map(str, args)],
                            stdout=subprocess.PIPE, text=True)


def writer(path, n, interval):
    """Child process: n events, one every `interval` seconds, stamped in meta."""
    with run.open_store(path, "normal") as store:
        due = time.monotonic()
        for i in range(n):
            due += interval
            time.sleep(max(0.0, due - time.monotonic()))
            store.dispatch("addUser", run.payload(i), meta={"t": time.time()})


def follower(path, n):
    """Child process: follow the file from seq 0 until n events came; print the count."""
    with fluxlite.open(path) as store:
        feed = store.follow(after=0, timeout=60)
        print("ready", flush=True)
        print(sum(1 for _ in itertools.islice(feed, n)), flush=True)


def case_delay(b, n, interval=0.02):
    with run.open_store(b.path(), "normal") as store:
        feed = store.follow(timeout=60)  # from the head now: 0
        proc = child("--writer", store.path, n, interval)
        delays = sorted(time.time() - event.meta["t"] for event, _ in itertools.islice(feed, n))
        assert proc.wait(timeout=60) == 0 and len(delays) == n, (proc.returncode, len(delays))
    median, p99 = statistics.median(delays), delays[math.ceil(0.99 * n) - 1]
    what = f"follow() delay, a writer process dispatching every {interval * 1e3:.0f} ms"
    record(b, f"{what}: median of {n} events", ms(median), target="<= 20 ms", ok=median <= 0.020)
    record(b, f"{what}: p99 of {n} events", ms(p99), f"max {ms(delays[-1])}",
           target="<= 50 ms", ok=p99 <= 0.050)


def dispatch_time(b, n, subscribers=0, follow=False):
    """Seconds for n single dispatches on a fresh file, with listeners attached."""
    with run.open_store(b.path(), "normal") as store:
        for _ in range(subscribers):
            store.subscribe(lambda event, changes: None)
        proc = child("--follower", store.path, n) if follow else None
        if proc:
            assert proc.stdout.readline().strip() == "ready"
        seconds = timed(lambda: [store.dispatch("addUser", run.payload(i)) for i in range(n)])
        if proc:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0 and int(out) == n, (proc.returncode, out)
    return seconds


def case_rates(b, n):
    setups = {"0 subscribers": (0, False), "1 subscriber": (1, False),
              "10 subscribers": (10, False), "0 subscribers + a follower process": (0, True)}
    times = interleave(b.repeat, **{name: (lambda s=s, f=f: dispatch_time(b, n, s, f))
                                    for name, (s, f) in setups.items()})
    base = n / min(times["0 subscribers"])
    for name, seconds in times.items():
        rate = n / min(seconds)
        ref = f"{base:,.0f} ev/s with 0 subscribers" if name != "0 subscribers" else ""
        record(b, f"dispatch, durability=normal, {name} ({n:,} events)", f"{rate:,.0f} ev/s",
               ref, f"**{rate / base:.2f}**")


def main():
    p = parser(__doc__, repeat=3)
    p.add_argument("--writer", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--follower", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.writer:
        return writer(args.writer[0], int(args.writer[1]), float(args.writer[2]))
    if args.follower:
        return follower(args.follower[0], int(args.follower[1]))
    with bench(args, "fluxlite live data", "Delay: from just before dispatch() in the writer "
               "process to follow() yielding the event here. Rates: best of the rounds; "
               "ratio = rate / the 0-subscriber rate of the same run.") as b:
        case_delay(b, 50 if args.quick else 200)
        case_rates(b, 1_000 if args.quick else 5_000)


if __name__ == "__main__":
    main()
