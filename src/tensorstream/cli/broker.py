"""``tensorstream broker``: the embedded Kafka-protocol broker in the foreground."""

from __future__ import annotations

import signal
import time
from typing import Annotated

import typer

from tensorstream.cli.common import console, fail, out


def broker(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 = a free one).")] = 9092,
) -> None:
    """Run the embedded Kafka-protocol broker (Tansu, in memory) in the foreground; Ctrl-C stops it."""
    from tensorstream.kafka import BrokerError, EmbeddedBroker
    from tensorstream.kafka.local import LocalBrokers

    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)  # before anything is printed: callers may stop us at once
    b = EmbeddedBroker(port=port or None)
    try:
        b.start()
    except BrokerError as e:
        fail(str(e))
    registry = LocalBrokers()
    state_file = registry.register(b.bootstrap_servers)  # our own file: other brokers' exits cannot remove it
    console.print(f"[green]broker ready[/] at [bold]{b.bootstrap_servers}[/] (in memory; data is lost on stop). "
                  "Ctrl-C to stop.")
    out.print(b.bootstrap_servers)
    try:
        while not stop and b.running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        died = not b.running and not stop
        b.stop()
        registry.unregister(state_file)
    if died:
        fail(f"the broker exited unexpectedly; log tail:\n{b.log_tail()}")
    console.print("broker stopped")
