#!/usr/bin/env python3
"""Text to video with Step-Video-T2V on one GPU (or the CPU).

    python generate.py --model-dir ./stepvideo-t2v-int8 --profile 24gb --prompt "..." --output out.mp4
    python generate.py --demo --prompt "a cat playing piano"

Run with --help for every option.
"""
import sys

if __name__ == "__main__":
    try:   # Ctrl-C while the package and torch load (the first second or two): one line, exit 130
        from lowvram_stepvideo.__main__ import leave, run
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    leave(run("generate.py"))
