"""`python -m lowvram_stepvideo ...` and the `lowvram-stepvideo` command: the same command line as generate.py (see
--help). The command line is imported inside the guard, so Ctrl-C while torch loads is one line too."""
import contextlib
import os
import signal
import sys

INTERRUPTED = 130   # face/exit_codes.INTERRUPTED, which cannot be imported before the guard


def interrupted() -> int:
    """Ctrl-C before the command line's own handling (imports): one line, exit 130."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C while saying so changes nothing
    try:
        print("interrupted", file=sys.stderr, flush=True)
    finally:   # an in-process caller (and the processes it starts later) keeps its own Ctrl-C
        signal.signal(signal.SIGINT, previous)
    return INTERRUPTED


@contextlib.contextmanager
def ctrl_c_held():
    """Ctrl-C inside is delivered when it ends: an import of torch interrupted half-way left numpy half-imported,
    which a library swallowed and the run failed later with a traceback. Where the platform cannot hold signals
    (Windows), nothing is held."""
    hold = getattr(signal, "pthread_sigmask", None)
    if hold is None:
        yield
        return
    hold(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        hold(signal.SIG_UNBLOCK, {signal.SIGINT})


def leave(status: int) -> None:
    """End the command's process with `status`, Ctrl-C ignored from here (the interpreter's teardown would otherwise
    die of it, status -2, after a finished run). After Ctrl-C, without the teardown: what the run writes is closed
    by then (its finally blocks ran) and nothing uses atexit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if status == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def run(prog: str) -> int:
    try:
        with ctrl_c_held():
            from .face.cli import main
        return main(sys.argv[1:], prog=prog)
    except KeyboardInterrupt:
        return interrupted()


def entry_point() -> None:
    """The `lowvram-stepvideo` command a pip install creates."""
    leave(run("lowvram-stepvideo"))


if __name__ == "__main__":
    leave(run("python -m lowvram_stepvideo"))
