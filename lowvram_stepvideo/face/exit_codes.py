"""Exit statuses of the command-line tools (generate.py, `python -m lowvram_stepvideo`, quantize.py); the README
lists them. Every error that has a one-line message exits BAD_INPUT; a traceback (exit 1) is a bug."""
OK = 0
UNEXPECTED = 1       # an unexpected error: Python prints a traceback (please report it)
BAD_INPUT = 2        # usage mistakes and every one-line "error: ..." (bad flag, folder, profile, output, OOM)
DOES_NOT_FIT = 3     # --dry-run: the memory plan says nothing on the preset ladder fits the card
BATCH_INCOMPLETE = 4  # --prompts-file: at least one video failed (the summary says which and why)
INTERRUPTED = 130    # Ctrl-C (128 + SIGINT); generate.py saves its resume checkpoint first
