"""Follow a kvstore daemon's KV events and print what each tier holds.

    kvstore serve ... --events ipc:///tmp/kv-events.sock --events-replay ipc:///tmp/kv-replay.sock &
    python examples/kv_events_subscriber.py ipc:///tmp/kv-events.sock ipc:///tmp/kv-replay.sock

Every batch prints one line (sequence number, incarnation, events, pages per
tier). ``--state FILE`` also writes the rebuilt contents as JSON after each
change (page keys in hex per tier), ``--seconds N`` stops after N seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.events.subscriber import EventSubscriber  # noqa: E402


def write_state(sub: EventSubscriber, path: str) -> None:
    view = sub.view
    state = {"incarnation": view.incarnation, "last_seq": view.last_seq,
             "is_complete": view.is_complete, "num_batches": view.num_batches,
             "num_incarnations": view.num_incarnations, "num_replays": sub.num_replays,
             "tiers": {medium: sorted(k.hex() for k in keys) for medium, keys in view.tiers.items()}}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)   # a reader never sees half a file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", help="the daemon's events address (PUB)")
    parser.add_argument("replay", nargs="?", help="the daemon's events_replay address")
    parser.add_argument("--topic", default="")
    parser.add_argument("--state", help="write the rebuilt contents here (JSON) after each change")
    parser.add_argument("--seconds", type=float, help="stop after this many seconds")
    parser.add_argument("--quiet", action="store_true", help="no line per batch")
    args = parser.parse_args(argv)
    sub = EventSubscriber(args.events, args.replay, args.topic)
    end = time.monotonic() + args.seconds if args.seconds else float("inf")
    try:
        changed = sub.catch_up()   # what the daemon holds already, if its replay has it
        while time.monotonic() < end:
            changed += sub.poll(timeout_s=0.1)
            if not changed:
                continue
            view = sub.view
            if not args.quiet:
                counts = ", ".join(f"{m} {len(k)}" for m, k in view.tiers.items())
                print(f"seq {view.last_seq} incarnation {view.incarnation[:8]}: {counts}"
                      f"{'' if view.is_complete else ' (incomplete: batches were lost)'}", flush=True)
            if args.state:
                write_state(sub, args.state)
            changed = 0
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
