"""Both tokenizers against the release tokenizer files and the reference token ids in text_io.safetensors."""
import hashlib
import json
import shutil

import pytest
import sentencepiece
import torch
from conftest import RELEASE_MODEL, read_io

from lowvram_stepvideo.files.weights import CheckpointError
from lowvram_stepvideo.files.tokenizers import load_clip_tokenizer, load_step_llm_tokenizer

STEP_DIR = RELEASE_MODEL / "step_llm"
CLIP_DIR = RELEASE_MODEL / "hunyuan_clip"


def _text_io(fixture_dir):
    io, meta = read_io(fixture_dir / "text_io.safetensors")
    return io, meta, json.loads(meta["prompts"])


def test_tokenizer_files_are_the_fixture_ones(fixture_dir):
    _, meta, _ = _text_io(fixture_dir)
    want = json.loads(meta["tokenizer_sha256"])
    files = {"step1_chat_tokenizer.model": STEP_DIR / "step1_chat_tokenizer.model",
             "hunyuan_clip/tokenizer/vocab.txt": CLIP_DIR / "tokenizer" / "vocab.txt"}
    assert {name: hashlib.sha256(files[name].read_bytes()).hexdigest() for name in want} == want


def test_step_llm_tokens_match_reference_at_release_length(fixture_dir):
    io, _, prompts = _text_io(fixture_dir)
    ids, mask = load_step_llm_tokenizer(STEP_DIR)(prompts)
    assert torch.equal(ids, io["tok.step_llm.input_ids_320"]) and ids.dtype == torch.int64
    assert torch.equal(mask, io["tok.step_llm.attention_mask_320"]) and mask.dtype == torch.int64


def test_clip_tokens_match_reference_at_release_length(fixture_dir):
    io, _, prompts = _text_io(fixture_dir)
    ids, mask = load_clip_tokenizer(CLIP_DIR)(prompts)
    assert torch.equal(ids, io["tok.clip.input_ids_77"]) and ids.dtype == torch.int64
    assert torch.equal(mask, io["tok.clip.attention_mask_77"]) and mask.dtype == torch.int64


def test_truncation_matches_reference_at_fixture_lengths(fixture_dir):
    """The tiny runs tokenised the same prompts at shorter lengths, so the prompts were truncated there."""
    io, meta, prompts = _text_io(fixture_dir)
    ids, mask = load_step_llm_tokenizer(STEP_DIR, int(meta["llm_max_length"]))(prompts)
    assert torch.equal(ids, io["in.step_llm.input_ids_real"])
    assert torch.equal(mask, io["in.step_llm.attention_mask"])
    ids, mask = load_clip_tokenizer(CLIP_DIR, int(meta["clip_max_length"]))(prompts)
    assert torch.equal(ids, io["in.clip.input_ids_real"])
    assert torch.equal(mask, io["in.clip.attention_mask"])


def test_step_llm_empty_and_overlong_prompts():
    tok = load_step_llm_tokenizer(STEP_DIR)
    ids, mask = tok([""])
    assert ids.shape == (1, 320) and ids[0, 0] == 1 and (ids[0, 1:] == 2).all()
    assert mask[0, :2].tolist() == [1, 1] and mask[0, 2:].sum() == 0
    long_prompt = "a red fox jumps over the lazy dog, " * 60
    raw = sentencepiece.SentencePieceProcessor(model_file=str(STEP_DIR / "step1_chat_tokenizer.model"))
    assert len(raw.encode_as_ids(long_prompt)) > 318
    ids, mask = tok(long_prompt)  # a single string counts as one prompt
    assert ids[0].tolist() == [1] + raw.encode_as_ids(long_prompt)[:318] + [2]
    assert mask.sum() == 320


def test_clip_empty_and_overlong_prompts():
    ctok = load_clip_tokenizer(CLIP_DIR)
    ids, mask = ctok([""])
    assert ids.shape == (1, 77) and ids[0, :2].tolist() == [101, 102] and (ids[0, 2:] == 0).all()
    assert mask[0].tolist() == [1, 1] + [0] * 75
    long_prompt = "一只红色的狐狸跳过了懒狗。" * 10
    untruncated, _ = load_clip_tokenizer(CLIP_DIR, 512)(long_prompt)
    ids, mask = ctok(long_prompt)
    assert ids[0].tolist() == untruncated[0, :76].tolist() + [102]
    assert mask.sum() == 77


def test_missing_files_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="step1_chat_tokenizer.model") as err:
        load_step_llm_tokenizer(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "tokenizer").mkdir()
    shutil.copy(CLIP_DIR / "tokenizer" / "vocab.txt", tmp_path / "tokenizer" / "vocab.txt")
    with pytest.raises(CheckpointError, match="tokenizer_config.json") as err:
        load_clip_tokenizer(tmp_path)
    assert "\n" not in str(err.value)


def test_step_llm_tokenizer_without_chat_tokens_is_rejected(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"sample sentence number {i} about foxes and dogs" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "plain"),
                                             vocab_size=40, minloglevel=2)
    (tmp_path / "plain.model").rename(tmp_path / "step1_chat_tokenizer.model")
    with pytest.raises(CheckpointError, match="special token <\\|BOT\\|> missing"):
        load_step_llm_tokenizer(tmp_path)
