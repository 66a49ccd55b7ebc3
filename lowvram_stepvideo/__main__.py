"""`python -m lowvram_stepvideo ...` and the `lowvram-stepvideo` command: the same command line as generate.py (see
--help). The command line is imported inside the guard, so Ctrl-C while torch loads is one line too."""
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


def run(prog: str) -> int:
    try:
        from .face.cli import main
        return main(sys.argv[1:], prog=prog)
    except KeyboardInterrupt:
        return interrupted()


def entry_point() -> None:
    """The `lowvram-stepvideo` command a pip install creates."""
    sys.exit(run("lowvram-stepvideo"))


if __name__ == "__main__":
    sys.exit(run("python -m lowvram_stepvideo"))
