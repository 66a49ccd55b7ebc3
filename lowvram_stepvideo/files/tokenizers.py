"""The two text tokenizers, reproducing the release's exactly (STEPVIDEO.md §6.1, §6.2).

- step_llm: SentencePiece `step1_chat_tokenizer.model`; [BOS] + ids[:L-2] + [EOS], padded with EOS (= PAD = 2).
- hunyuan_clip: `transformers.BertTokenizer` semantics (basic + WordPiece, lower-casing, per-character Chinese),
  built from `vocab.txt` with the `tokenizers` library; [CLS] ... [SEP], padded with [PAD], truncated.
Both return a callable `prompts -> (input_ids, attention_mask)`, int64 tensors of shape (B, max_length).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import sentencepiece
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from .weights import CheckpointError
from .configs import ClipConfig, StepLLMConfig, read_json

Tokenize = Callable[[Sequence[str] | str], tuple[torch.Tensor, torch.Tensor]]   # also .count(text), .room
MAX_CLIP_TOKENS = 512    # BERT position embeddings; a tokenizer config asking for more is broken

STEP_LLM_TOKENIZER_FILE = "step1_chat_tokenizer.model"
STEP_BOS, STEP_EOS, STEP_PAD = 1, 2, 2
# the release's tokenizer constructor asserts these exist (the first six as control tokens)
STEP_CONTROL_TOKENS = ("<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>", "<|THINK_END|>")
STEP_PLAIN_TOKENS = ("<|MASK_1e69f|>", "<|UNMASK_1e69f|>")
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _as_list(prompts: Sequence[str] | str) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _require(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found; copy it from the release folder")
    return path


_LOADED: dict[tuple, Tokenize] = {}


def _reused(build: Callable[..., Tokenize], files: tuple[Path, ...], *args) -> Tokenize:
    """A tokenizer built from `files` once, reused while they are unchanged (a run, its plan and its prompt
    checks tokenize several times; building one takes ~0.1 s)."""
    key = (build.__name__, *args, *((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _LOADED:
        _LOADED[key] = build(*args)
    return _LOADED[key]


def load_step_llm_tokenizer(folder: Path, max_length: int = StepLLMConfig.max_length) -> Tokenize:
    """`folder` is the release's `step_llm/`. The tokenizer returns ids/mask (B, max_length)."""
    path = _require(Path(folder) / STEP_LLM_TOKENIZER_FILE)
    return _reused(_step_llm_tokenizer, (path,), path, max_length)


def _step_llm_tokenizer(path: Path, max_length: int) -> Tokenize:
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable SentencePiece model ({e}); re-download it") from None
    _check_step_special_tokens(sp, path)

    def tokenize(prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        texts = _as_list(prompts)
        pieces = sp.encode(texts, out_type=int) if texts else [[]]  # the release turns [] into one empty prompt
        rows = [[STEP_BOS] + ids[:max_length - 2] + [STEP_EOS] for ids in pieces]
        mask = [[1] * len(r) + [0] * (max_length - len(r)) for r in rows]
        ids = [r + [STEP_PAD] * (max_length - len(r)) for r in rows]
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.int64)

    tokenize.count = lambda text: len(sp.encode(text, out_type=int))
    tokenize.room = max_length - 2
    return tokenize


def _check_step_special_tokens(sp: sentencepiece.SentencePieceProcessor, path: Path) -> None:
    for token in STEP_CONTROL_TOKENS + STEP_PLAIN_TOKENS:
        idx = sp.piece_to_id(token)
        if sp.id_to_piece(idx) != token or (token in STEP_CONTROL_TOKENS and not sp.is_control(idx)):
            raise CheckpointError(f"{path}: not the Step-1 chat tokenizer (special token {token} missing); "
                                  "use the release's step_llm folder")


def load_clip_tokenizer(folder: Path, max_length: int | None = None) -> Tokenize:
    """`folder` is the release's `hunyuan_clip/` (or its `tokenizer/`). Length: argument, else the tokenizer
    config's model_max_length, else ClipConfig.max_length (77)."""
    folder = Path(folder)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    files = (_require(folder / "vocab.txt"), _require(folder / "tokenizer_config.json"))
    return _reused(_clip_tokenizer, files, folder, max_length)


def _clip_tokenizer(folder: Path, max_length: int | None) -> Tokenize:
    vocab = _read_vocab(folder / "vocab.txt")
    config = folder / "tokenizer_config.json"
    options = read_json(config)
    max_length = max_length or _clip_length(options.get("model_max_length", ClipConfig.max_length), config)
    full = _bert_tokenizer(vocab, options, folder / "vocab.txt")
    tk = _bert_tokenizer(vocab, options, folder / "vocab.txt")
    tk.enable_truncation(max_length)
    tk.enable_padding(length=max_length, pad_id=vocab["[PAD]"], pad_token="[PAD]")

    def tokenize(prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tk.encode_batch(_as_list(prompts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64).view(-1, max_length)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64).view(-1, max_length)
        return ids, mask

    tokenize.count = lambda text: len(full.encode(text).ids) - 2    # without [CLS] and [SEP]
    tokenize.room = max_length - 2
    return tokenize


def _clip_length(value, config: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_CLIP_TOKENS:
        raise CheckpointError(f"{config}: model_max_length {value!r} is not a token count from 2 to "
                              f"{MAX_CLIP_TOKENS} (the release has {ClipConfig.max_length}); re-download this file")
    return value


def truncation_warnings(tokenizers: dict[str, Tokenize], texts: dict[str, str]) -> list[str]:
    """One line per text (name -> text) that a tokenizer (name -> tokenizer) cuts: how many tokens are lost."""
    lines = []
    for label, text in texts.items():
        for encoder, tokenize in tokenizers.items():
            n = tokenize.count(text)
            if n > tokenize.room:
                lines.append(f"warning: the {label} is {n} {encoder} tokens long; {encoder} reads the first "
                             f"{tokenize.room} and drops the last {n - tokenize.room}")
    return lines


def _read_vocab(path: Path) -> dict[str, int]:
    """One token per line, split on '\\n' only (the vocab holds a U+2028 token that str.splitlines would break)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab = {token: i for i, token in enumerate(lines)}
    missing = [t for t in BERT_SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise CheckpointError(f"{path}: special token {missing[0]} missing; not a BERT vocabulary, re-download it")
    return vocab


def _bert_tokenizer(vocab: dict[str, int], options: dict, vocab_path: Path) -> Tokenizer:
    """BertTokenizer's pipeline: clean text, split Chinese characters, lower-case (+ strip accents unless told
    otherwise), split on whitespace and punctuation, WordPiece (100 chars max per word), [CLS] x [SEP]."""
    if not options.get("do_basic_tokenize", True):
        raise CheckpointError(f"{vocab_path.parent}/tokenizer_config.json: do_basic_tokenize false is not supported")
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tk.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=options.get("tokenize_chinese_chars", True),
        strip_accents=options.get("strip_accents"), lowercase=options.get("do_lower_case", True))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tk.add_special_tokens(list(BERT_SPECIAL_TOKENS))
    return tk


def length_only_tokenizer(max_length: int, pad_id: int = 0) -> Tokenize:
    """A stand-in with the tokenizers' interface for planning a release that is not on disk (no tokenizer files):
    every prompt padded to `max_length`, as both real tokenizers pad, so the planned tensors have the run's shapes.
    It counts no tokens (`count` is 0: nothing is truncated)."""
    def tokenize(prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = max(1, len(_as_list(prompts)))
        mask = torch.zeros(rows, max_length, dtype=torch.int64)
        mask[:, :2] = 1                                       # a start and an end token
        return torch.full((rows, max_length), pad_id, dtype=torch.int64), mask

    tokenize.count = lambda text: 0
    tokenize.room = max_length - 2
    return tokenize
