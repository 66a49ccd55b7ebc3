#!/usr/bin/env python3
"""Quantize a Step-Video-T2V release folder to int8 or fp8 weights, once, offline.

    python quantize.py --model-dir ./stepvideo-t2v --out ./stepvideo-t2v-int8 --format int8 [--verify]

The output folder has the release layout and opens exactly like the release. An interrupted run resumes when the
same command is given again. See lowvram_stepvideo/tools/quantize_folder.py (folder conversion) and
lowvram_stepvideo/models/quant.py (scheme).
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

INTERRUPTED = 130   # lowvram_stepvideo.face.exit_codes.INTERRUPTED (not imported before the guard)


EPILOG = """\
examples:
  python quantize.py --model-dir ./stepvideo-t2v --out ./stepvideo-t2v-int8 --format int8
  python quantize.py --model-dir ./stepvideo-t2v --out ./stepvideo-t2v-fp8 --format fp8 --verify
  an interrupted run continues when the same command is given again (work is kept in OUT.partial/)

what is not quantized (configs, tokenizers, the scheduler, the VAE, a CLIP left out) is hard-linked from
--model-dir into --out (no extra disk; copied where the two folders are on different file systems): a
hard-linked file is ONE file in both folders, so editing it in place changes both. Replace such a file (write
a new one, then rename it over the old) or copy it first (cp --remove-destination).

exit status:
  0 done; 2 bad input (a one-line "error: ..." says what to change); 130 interrupted; 1 unexpected error
"""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True, help="release folder (holds model_index.json)")
    ap.add_argument("--out", type=Path, required=True, help="new folder to create (outside --model-dir)")
    ap.add_argument("--format", required=True, help="int8 or fp8 (e4m3); both use per-output-channel scales")
    ap.add_argument("--components", default="transformer,step_llm,hunyuan_clip",
                    help="comma-separated components to quantize: transformer, step_llm, hunyuan_clip "
                         "(default: all three; a CLIP left out is still converted to float32 safetensors)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--verify", action="store_true", help="print the error of sampled quantized layers")
    ap.add_argument("--shard-size-mb", type=int, default=4096, help="largest output shard (default 4096)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:   # Ctrl-C at any moment, the imports of torch included: one line, exit 130
        return quantize(args)
    except KeyboardInterrupt:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C while saying so changes nothing
        try:
            print(f"interrupted; run the same command again to resume from {args.out}.partial", file=sys.stderr)
        finally:   # an in-process caller (and the processes it starts later) keeps its own Ctrl-C
            signal.signal(signal.SIGINT, previous)
        return INTERRUPTED


def quantize(args: argparse.Namespace) -> int:
    from lowvram_stepvideo.__main__ import ctrl_c_held
    with ctrl_c_held():   # a Ctrl-C while torch loads is delivered after it (see there)
        from tqdm import tqdm

        from lowvram_stepvideo.face import exit_codes
        from lowvram_stepvideo.files.weights import CheckpointError
        from lowvram_stepvideo.tools.quantize_folder import quantize_folder
        from lowvram_stepvideo.tools.quantize_verify import format_verify_table

    def log(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    try:
        result = quantize_folder(args.model_dir, args.out, args.format, args.components, args.force, args.verify,
                                 args.shard_size_mb * 2**20, log)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    rate = result.source_bytes / max(result.seconds, 1e-9) / 1e6
    print(f"wrote {args.out}: {len(result.written)} shards written, {len(result.reused)} reused, "
          f"{result.source_bytes / 1e9:.2f} GB converted in {result.seconds:.1f} s ({rate:.0f} MB/s)")
    linked, copied = result.carried
    if linked:
        print(f"note: {linked} files (configs, tokenizers, VAE, ...) are hard links to the same files in "
              f"{args.model_dir} ({copied} copied): edit neither in place (see --help)", file=sys.stderr)
    if result.verify_rows:
        print(format_verify_table(result.verify_rows))
    return exit_codes.OK


if __name__ == "__main__":
    try:
        status = main()
        from lowvram_stepvideo.__main__ import leave
    except KeyboardInterrupt:   # while argparse ran
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    leave(status)   # after Ctrl-C without the interpreter's teardown (see there)
