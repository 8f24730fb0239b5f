"""A stop signal during start-up: imports, the dataset (generated, indexed), the models, the teacher's zero-shot pass,
up to the first step. Standard library only, so that it is in place before torch loads.

SIGINT, SIGTERM or SIGUSR1 then ends the process with one line on stderr and exit status 128 + the signal (130, 143,
138), without a traceback: the handler raises ``StartupStop`` (a ``SystemExit``), which unwinds through the clean-ups
on its way out (a half-generated dataset folder, a temporary file, the folder lock), so nothing partial stays.
Once the loop runs, ``scmd.run.StopSignals`` takes over: the run finishes its step and writes a checkpoint."""

import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StartupStop(SystemExit):
    """Exit status 128 + signal; the line is already on stderr."""


def stop(signum: int, frame=None) -> None:
    """The start-up handler: later stop signals are ignored (they would interrupt the clean-up), then one line and
    StartupStop."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # loader workers that die of the same signal must not raise torch's "worker killed" error during the clean-up
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    print(f"scmd_ref.py: stopped by {signal.Signals(signum).name} during start-up; nothing was trained; rerun the same "
          f"command", file=sys.stderr, flush=True)
    raise StartupStop(128 + signum)


def stop_during_start_up() -> None:
    """Install the start-up handler for SIGINT, SIGTERM and SIGUSR1."""
    for sig in SIGNALS:
        signal.signal(sig, stop)
