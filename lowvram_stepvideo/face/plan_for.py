"""Planning for what this machine does not have, for generate.py's dry-run: a card (`--card NAME`, or
`--capability X.Y` with `--vram-gib`; `--list-cards` lists the known ones), several of them (`--gpus N`) and a
release that is not downloaded (`--model-dir stepfun-ai/stepvideo-t2v`: planned from the shapes the package
ships)."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from ..engines.cards import CARDS, Card, card_by_name, card_table, describe_card, parse_capability
from ..errors import UsageError

GiB = 2**30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--card", metavar="NAME",
                   help="with --dry-run: plan for this card (its memory, compute capability and speed), e.g. "
                        "\"RTX 3060\" or T4; --list-cards lists them")
    p.add_argument("--capability", metavar="X.Y",
                   help="with --dry-run and --vram-gib: the compute capability of the card planned for, e.g. 7.5 "
                        "(decides which attention kernel runs)")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="with --dry-run: plan a run on N such cards, one process each (torchrun --nproc-per-node N, "
                        "--parallel as given or auto); the plan is one process's share (e.g. --card T4 --gpus 2)")
    p.add_argument("--list-cards", action="store_true",
                   help="list the cards --card knows (memory, compute capability, throughput) and exit")


@dataclass(frozen=True)
class Target:
    """The card a dry-run plans for: a table card, or only a capability (with --vram-gib), or neither (this
    machine's card)."""
    card: Card | None = None
    capability: tuple[int, int] | None = None

    @property
    def vram_bytes(self) -> int | None:
        return None if self.card is None else int(self.card.vram_gib * GiB)


def target(args) -> Target:
    """The card options checked: a known card, no --vram-gib beside --card, a capability only with --vram-gib."""
    if args.card is not None and args.capability is not None:
        raise UsageError("--card gives the compute capability; drop --capability (or --card with --vram-gib)")
    if args.card is not None:
        card = card_by_name(args.card)
        if card is None:
            raise UsageError(f"--card {args.card!r}: not a card this version knows; --list-cards lists them "
                             "(or give --vram-gib N --capability X.Y)")
        if args.vram_gib is not None:
            raise UsageError(f"--card {card.name} gives the card's memory ({card.vram_gib:g} GB); drop --vram-gib")
        return Target(card, card.capability)
    if args.capability is not None:
        if args.vram_gib is None:
            raise UsageError("--capability goes with --vram-gib (the card's memory), e.g. --vram-gib 16 "
                             "--capability 7.5; or name the card with --card")
        try:
            return Target(None, parse_capability(args.capability))
        except ValueError as e:
            raise UsageError(str(e)) from None
    return Target()


def release_format(folder, profile, assume_format: str | None, say) -> str | None:
    """The weight format a release that is not on disk is planned in: --assume-format, else the profile's (every
    GPU tier runs quantize.py's output; planning the bf16 download would only say it must be quantized)."""
    if assume_format or not folder.published or profile.weight_format == folder.weight_format:
        return assume_format
    say(f"{folder.published}: planned from the shapes this package ships (nothing is downloaded), as "
        f"quantize.py's {profile.weight_format} output, the weight format of profile {profile.name} "
        "(--assume-format picks another)")
    return profile.weight_format


def list_cards(as_json: bool) -> None:
    print(json.dumps([describe_card(c) for c in CARDS], indent=1) if as_json else card_table())
