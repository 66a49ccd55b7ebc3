"""A tiny random-weight Step-Video model in the exact release folder layout, for `generate.py --demo` (T2V) and
`generate.py --demo --image PATH` (TI2V: its DiT takes the first image and a motion score, its VAE has an encoder).

Nothing is downloaded and nothing outside the package is read: configs are constants below, tensor names and
shapes come from this project's modules built on the meta device, weights are seeded random values, and both
tokenizers are made here in the release formats (a SentencePiece model trained on a small built-in corpus, a
BERT `vocab.txt`). The folder is built once into the user cache (or a given folder): in a temporary folder next
to it, renamed into place when complete. A manifest written last records the files and a fingerprint of the
configs and module shapes; a demo folder whose manifest is missing, stale or does not match its files is rebuilt
(a folder holding anything else is never touched).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..files.caches import CACHE_ENV, cache_home
from .assign import build_on_meta
from ..errors import StepVideoError
from ..files.configs import ClipConfig, DiTConfig, StepLLMConfig, VAEConfig
from ..models.clip import BertModel
from ..models.dit import StepVideoModel
from ..models.step_llm import Step1Model
from ..models.vae import AutoencoderKL

DEMO_VERSION = 1   # bump when the weight init changes (configs, corpus and module shapes are fingerprinted)
log = logging.getLogger(__name__)
MANIFEST = "demo_manifest.json"
DEMO_FILES = (  # the release layout (STEPVIDEO.md §1) with single-file weights, plus the tiny VAE's config
    "model_index.json", "scheduler/scheduler_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
    "step_llm/config.json", "step_llm/model.safetensors", "step_llm/step1_chat_tokenizer.model",
    "hunyuan_clip/clip_text_encoder/config.json", "hunyuan_clip/clip_text_encoder/model.safetensors",
    "hunyuan_clip/tokenizer/vocab.txt", "hunyuan_clip/tokenizer/tokenizer_config.json",
    "hunyuan_clip/tokenizer/special_tokens_map.json", "vae/config.json", "vae/vae_v2.safetensors")
SEED = 20240217

MODEL_INDEX = {"_class_name": "StepVideoPipeline", "_diffusers_version": "0.31.0",
               "scheduler": ["stepvideo", "FlowMatchDiscreteScheduler"],
               "transformer": ["stepvideo", "StepVideoModel"]}
SCHEDULER_CONFIG = {"_class_name": "FlowMatchDiscreteScheduler", "_diffusers_version": "0.31.0",
                    "device": None, "num_train_timesteps": 1000, "reverse": False, "solver": "euler"}
STEP_LLM_HIDDEN, CLIP_HIDDEN, Z_CHANNELS = 96, 32, 4
TRANSFORMER_CONFIG = {  # release keys; 2 heads x 128 (the RoPE split [64, 32, 32] needs head_dim 128)
    "_class_name": "StepVideoModel", "_diffusers_version": "0.31.0", "attention_head_dim": 128,
    "attention_type": "parallel", "caption_channels": [STEP_LLM_HIDDEN, CLIP_HIDDEN], "dropout": 0.0,
    "in_channels": Z_CHANNELS, "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_type": "ada_norm_single",
    "num_attention_heads": 2, "num_layers": 2, "out_channels": Z_CHANNELS, "patch_size": 1,
    "use_additional_conditions": False}
STEP_LLM_VOCAB = 640    # 256 byte-fallback pieces + 21 special tokens + the corpus's characters and pieces
STEP_LLM_CONFIG = {  # 6 heads (not a power of 2: the second ALiBi slope branch) in 2 KV groups
    "allow_transformer_engine": False, "architectures": ["Step1Model"], "attention_dropout": 0.0,
    "attention_impl": "GQA", "embedding_weights_in_fp32": False, "ffn_hidden_size": 256,
    "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": STEP_LLM_HIDDEN, "kv_channels": 16,
    "layernorm_epsilon": 1e-05, "max_position_embeddings": 16384, "num_attention_groups": 2,
    "num_attention_heads": 6, "num_layers": 2, "orig_vocab_size": STEP_LLM_VOCAB,
    "padded_vocab_size": STEP_LLM_VOCAB, "params_dtype": "torch.bfloat16", "seq_length": 16384,
    "torch_dtype": "bfloat16", "use_flash_attn": True}
CLIP_VOCAB = 512
CLIP_CONFIG = {  # max_position_embeddings must cover the tokenizer's 77 tokens
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "classifier_dropout": None,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": CLIP_HIDDEN, "initializer_range": 0.02,
    "intermediate_size": 64, "layer_norm_eps": 1e-12, "max_position_embeddings": 128, "model_type": "bert",
    "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0, "position_embedding_type": "absolute",
    "torch_dtype": "float32", "type_vocab_size": 2, "use_cache": True, "vocab_size": CLIP_VOCAB}
VAE_CONFIG = {  # decoder only, as the release pipeline uses it; widths multiples of 32 (GroupNorm)
    "z_channels": Z_CHANNELS, "version": 2, "num_res_blocks": 2, "in_channels": 3, "out_channels": 3,
    "encoder": {"ch": 32, "ch_mult": [1, 1, 1, 1], "down_sampling_layer": [1, 2], "present": False},
    "decoder": {"ch": 32, "ch_mult": [1, 1, 1, 1], "temporal_up_layers": [2, 3], "temporal_downsample": 4},
    "frame_len": 17, "latent_len": 3, "scale_factor": 1.0,
    "note": "tiny random-weight demo VAE; released: encoder ch=32 ch_mult=(4,8,16,16), decoder ch=128 "
            "ch_mult=(1,2,4,4), z=64"}
BERT_TOKENIZER_CONFIG = {
    "cls_token": "[CLS]", "do_basic_tokenize": True, "do_lower_case": True, "mask_token": "[MASK]",
    "never_split": None, "pad_token": "[PAD]", "sep_token": "[SEP]", "strip_accents": None,
    "tokenize_chinese_chars": True, "tokenizer_class": "BertTokenizer", "unk_token": "[UNK]",
    "model_max_length": 77}
BERT_SPECIAL_TOKENS_MAP = {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]",
                           "sep_token": "[SEP]", "unk_token": "[UNK]"}
# The release tokenizer's pieces 3..18 (control) and 19..20 (user-defined), in the same order and ids.
STEP_CONTROL = ["<|EOT|>", "<|BOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>", "<|THINK_END|>",
                "<|IMG_START|>", "<|IMG_END|>", "<|META_START|>", "<|META_END|>", "<im_patch>", "<im_start>",
                "<im_end>", "<dream>", "<dream_start>", "<dream_end>"]
STEP_USER_DEFINED = ["<|MASK_1e69f|>", "<|UNMASK_1e69f|>"]

CORPUS = """\
A cat playing the piano in a sunny living room, slow camera pan.
An astronaut discovers a glowing stone monument on the moon.
A red fox runs through fresh snow in a quiet pine forest at dawn.
Waves crash against black rocks under a stormy sky, cinematic lighting.
A little girl blows soap bubbles in a green park, soft focus, 4k.
Time-lapse of clouds moving over a mountain lake, wide shot.
A chef slices vegetables on a wooden board, close-up, shallow depth of field.
Neon lights reflect on a wet street at night while people walk by with umbrellas.
A golden retriever catches a frisbee on the beach in slow motion.
An old train crosses a stone bridge above a river valley in autumn.
Two dancers spin on a stage, spotlight, smoke, dramatic colours.
A hot air balloon rises over green fields at sunrise, aerial view.
Rain drops fall on a window, city lights blurred in the background.
A robot waters flowers in a small garden, bright morning light.
Fireworks explode over the harbour, reflections on the water, HDR video.
一名宇航员在月球上发现一块石碑，上面印有“stepfun”字样，闪闪发光。
一只小猫在阳光明媚的客厅里弹钢琴，镜头缓慢移动。
一只红色的狐狸在黎明时分穿过安静的松树林，雪花飘落。
海浪拍打着黑色的岩石，天空中乌云密布，电影感的光影。
小女孩在绿色的公园里吹泡泡，柔和的焦点，画面清晰。
延时摄影：云朵飘过山间湖泊，广角镜头，色彩鲜艳。
厨师在木板上切蔬菜，特写镜头，浅景深，专业级构图。
夜晚的城市街道上霓虹灯闪烁，行人撑着雨伞走过。
一只金毛犬在海滩上接住飞盘，慢动作，阳光灿烂。
一列老火车在秋天驶过河谷上方的石桥，远处是高山。
两名舞者在舞台上旋转，聚光灯，烟雾，戏剧性的色彩。
热气球在日出时升上绿色的田野，航拍视角，天空湛蓝。
雨滴落在窗户上，背景是模糊的城市灯光，安静而温暖。
一个机器人在小花园里给花浇水，明亮的晨光。
烟花在港口上空绽放，水面上倒映着五彩的光芒。
超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。
画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。
The quick brown fox jumps over the lazy dog 0123456789 times.
"""
ENGLISH_WORDS = ("the a an of and in on at with to by over under while is are it this that from for as "
                 "cat dog fox girl boy man woman robot chef train city street night day light sun moon sky "
                 "water sea river lake snow rain fire tree forest flower garden park room camera slow motion "
                 "shot close up wide view red green blue black white golden old little two bright soft").split()
SUFFIXES = ("##s", "##es", "##ed", "##ing", "##er", "##ly", "##y", "##al", "##tion")
CJK_PUNCTUATION = list("，。、：；！？“”‘’（）《》…—")


# ---- folder, cache and atomic build ---------------------------------------------------------------------------

KINDS = ("t2v", "ti2v")


def default_demo_dir(kind: str = "t2v") -> Path:
    return cache_home() / (f"demo-v{DEMO_VERSION}" if kind == "t2v" else f"demo-{kind}-v{DEMO_VERSION}")


class DemoError(StepVideoError, ValueError):
    """The demo model cannot be built where it must go; one line naming the folder and the fix."""


def build_demo_model(folder: Path | None = None, kind: str = "t2v") -> Path:
    """The demo model folder of `kind` ("t2v" or "ti2v"), built if missing, incomplete or stale; returns its path.
    When the default cache folder cannot be written (read-only home), the model is built in the system temp folder
    instead."""
    if kind not in KINDS:
        raise ValueError(f"demo model kind {kind!r}: choose one of {', '.join(KINDS)}")
    final = Path(folder) if folder is not None else default_demo_dir(kind)
    try:
        return _build(final, kind)
    except OSError as e:
        problem = f"cannot build the demo model in {final} ({e.strerror or e})"
    if folder is not None:
        raise DemoError(f"{problem}; pass a writable folder")
    fallback = Path(tempfile.gettempdir()) / f"lowvram-stepvideo-{os.getuid()}" / final.name
    log.warning(f"note: {problem}; using {fallback} (set {CACHE_ENV} to a writable folder to keep it)")
    try:
        return _build(fallback, kind)
    except OSError as e:
        raise DemoError(f"{problem}, nor in {fallback} ({e.strerror or e}); set {CACHE_ENV} to a writable "
                        "folder") from None


def _build(final: Path, kind: str = "t2v") -> Path:
    fingerprint = demo_fingerprint(kind)
    if is_complete(final, fingerprint):
        return final
    if final.exists() and not _replaceable(final):
        raise DemoError(f"{final} exists and is not a demo model folder; remove it or pass another folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    try:
        write_demo_model(tmp, kind)
        _write_manifest(tmp, fingerprint)
        _move_into_place(tmp, final, fingerprint)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def is_complete(folder: Path, fingerprint: str) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        return manifest["fingerprint"] == fingerprint and all(
            (folder / rel).stat().st_size == size for rel, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _replaceable(folder: Path) -> bool:
    """Only a (damaged or outdated) demo folder may be replaced: nothing in it but demo files."""
    known = set(DEMO_FILES) | {MANIFEST}
    return folder.is_dir() and all(p.relative_to(folder).as_posix() in known
                                   for p in folder.rglob("*") if not p.is_dir())


def _write_manifest(root: Path, fingerprint: str) -> None:
    """Written last, after every file is on disk (fsync), so a folder with a valid manifest is whole."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[p.relative_to(root).as_posix()] = p.stat().st_size
    manifest = {"demo_version": DEMO_VERSION, "fingerprint": fingerprint, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _move_into_place(tmp: Path, final: Path, fingerprint: str) -> None:
    """rename() is atomic; an incomplete folder in the way is moved aside first. If another process finished
    the same build meanwhile, its folder is kept and ours is discarded."""
    if final.exists() and not is_complete(final, fingerprint):
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=final.parent))
        os.replace(final, aside / "old")
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_complete(final, fingerprint):
            raise


def _remove_abandoned_builds(final: Path, older_than_s: float = 3600) -> None:
    """Temporary folders of builds that were killed (a live build is younger than this)."""
    for p in final.parent.glob(f".{final.name}.*-*"):
        if p.is_dir() and time.time() - p.stat().st_mtime > older_than_s:
            shutil.rmtree(p, ignore_errors=True)


# ---- what the folder holds ------------------------------------------------------------------------------------

def write_demo_model(root: Path, kind: str = "t2v") -> None:
    """Every file of the release layout (plus vae/config.json), written into the existing folder `root`."""
    root = Path(root)
    write_configs(root, kind)
    tok = root / "hunyuan_clip" / "tokenizer"
    _write_json(tok / "tokenizer_config.json", BERT_TOKENIZER_CONFIG)
    _write_json(tok / "special_tokens_map.json", BERT_SPECIAL_TOKENS_MAP)
    (tok / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
    (root / "step_llm" / "step1_chat_tokenizer.model").write_bytes(train_step_tokenizer())
    for i, (rel, module, dtype, rename) in enumerate(meta_modules(root)):
        state = random_state(module, torch.Generator().manual_seed(SEED + i), dtype)
        save_file({rename(k): v for k, v in state.items()}, str(root / rel), metadata={"format": "pt"})


def kind_configs(kind: str) -> tuple[dict, dict]:
    """The transformer and VAE configs of a demo of `kind`: TI2V's DiT takes the additional conditions (first
    image, motion score) and its VAE has an encoder (for the first image)."""
    if kind == "t2v":
        return TRANSFORMER_CONFIG, VAE_CONFIG
    encoder = {**VAE_CONFIG["encoder"], "present": True}
    return {**TRANSFORMER_CONFIG, "use_additional_conditions": True}, {**VAE_CONFIG, "encoder": encoder}


def write_configs(root: Path, kind: str = "t2v") -> None:
    transformer, vae = kind_configs(kind)
    _write_json(root / "model_index.json", MODEL_INDEX)
    _write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    _write_json(root / "transformer" / "config.json", transformer)
    _write_json(root / "step_llm" / "config.json", STEP_LLM_CONFIG)
    _write_json(root / "hunyuan_clip" / "clip_text_encoder" / "config.json", CLIP_CONFIG)
    _write_json(root / "vae" / "config.json", vae)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def meta_modules(root: Path) -> list[tuple[str, torch.nn.Module, torch.dtype, Callable[[str], str]]]:
    """(weight file, module on meta, storage dtype, module key -> file key) per network, built from the config
    files under `root` with the same readers and classes the loaders use."""
    dit = DiTConfig.from_file(root / "transformer" / "config.json")
    llm = StepLLMConfig.from_file(root / "step_llm" / "config.json")
    clip = ClipConfig.from_file(root / "hunyuan_clip" / "clip_text_encoder" / "config.json")
    vae = VAEConfig.from_folder(root / "vae")
    same = str  # identity on key names
    return [
        ("transformer/diffusion_pytorch_model.safetensors", build_on_meta(lambda: StepVideoModel(dit)),
         torch.bfloat16, same),
        ("step_llm/model.safetensors", build_on_meta(lambda: Step1Model(llm)), torch.bfloat16, same),
        ("hunyuan_clip/clip_text_encoder/model.safetensors",
         build_on_meta(lambda: BertModel(clip, with_pooler=True)), torch.float32, same),
        ("vae/vae_v2.safetensors", build_on_meta(lambda: AutoencoderKL(vae, with_encoder=vae.encoder.present)),
         torch.bfloat16, _release_vae_key),
    ]


def _release_vae_key(key: str) -> str:
    # the module wraps the last conv as decoder.conv_out.conv; the release file names it decoder.conv_out
    return key.replace("decoder.conv_out.conv.", "decoder.conv_out.")


def demo_fingerprint(kind: str = "t2v") -> str:
    """Changes whenever a config, the tokenizer inputs or a module's tensor names/shapes change."""
    with tempfile.TemporaryDirectory() as d:
        write_configs(Path(d), kind)
        modules = meta_modules(Path(d))
    shapes = {rel: [(k, list(v.shape)) for k, v in m.state_dict().items()] for rel, m, _, _ in modules}
    transformer, vae = kind_configs(kind)
    payload = [DEMO_VERSION, SEED, transformer, STEP_LLM_CONFIG, CLIP_CONFIG, vae, CORPUS,
               STEP_CONTROL, STEP_USER_DEFINED, bert_vocab(), shapes]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


# ---- random weights -------------------------------------------------------------------------------------------

def random_state(module: torch.nn.Module, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded values at scales that keep activations O(1): matrices ~ N(0, 1/fan_in), norm weights ~ 1 + 0.1 N,
    biases ~ 0.02 N, embeddings ~ N(0, 1), modulation tables ~ N(0, 1/D) (as the release initialises them)."""
    out = {}
    for name, p in module.state_dict().items():
        shape = tuple(p.shape)
        noise = torch.randn(shape, generator=gen)
        if name.endswith("scale_shift_table"):
            value = noise / shape[-1] ** 0.5
        elif name.endswith("bias"):
            value = 0.02 * noise
        elif len(shape) == 1:               # norm weights (embeddings.LayerNorm included)
            value = 1.0 + 0.1 * noise
        elif "embeddings" in name:          # word / position / token-type tables
            value = noise
        else:
            value = noise / (noise[0].numel() ** 0.5)  # fan_in = product of all but the output dim
        out[name] = value.to(dtype).contiguous()
    return out


# ---- tokenizers ---------------------------------------------------------------------------------------------

def train_step_tokenizer() -> bytes:
    """A SentencePiece model in the release's format and conventions: unigram, identity normalisation, byte
    fallback, split digits, 0 <unk> 1 <s> 2 </s>, then the chat control tokens and the two user-defined ones at
    the release's ids (3..20); vocabulary = the tiny step_llm's embedding rows."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, vocab_size=STEP_LLM_VOCAB,
        model_type="unigram", character_coverage=1.0, byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=STEP_CONTROL,
        user_defined_symbols=STEP_USER_DEFINED, hard_vocab_limit=True, num_threads=1, minloglevel=2)
    return model.getvalue()


def bert_vocab() -> list[str]:
    """CLIP_VOCAB tokens with the release vocab's layout of ids 0..105 ([PAD]=0, [unused1..99], [UNK]=100,
    [CLS]=101, [SEP]=102, [MASK]=103, <S>, <T>), then ASCII punctuation, digits, lower-case letters and their
    '##' continuations (so any lower-case word tokenizes), a few whole words and suffixes, CJK punctuation, and
    the corpus's Chinese characters, most frequent first."""
    head = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "<S>", "<T>"]
    ascii_chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]   # punctuation, digits, a-z
    letters = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokens = list(dict.fromkeys(head + ascii_chars + letters + ENGLISH_WORDS + list(SUFFIXES) + CJK_PUNCTUATION))
    tokens += [c for c in _chinese_by_frequency() if c not in tokens][:CLIP_VOCAB - len(tokens)]
    if len(tokens) != CLIP_VOCAB:
        raise AssertionError(f"demo BERT vocab has {len(tokens)} tokens, expected {CLIP_VOCAB}")
    return tokens


def _chinese_by_frequency() -> list[str]:
    counts: dict[str, int] = {}
    for ch in CORPUS:
        if "\u4e00" <= ch <= "\u9fff":
            counts[ch] = counts.get(ch, 0) + 1
    return sorted(counts, key=lambda c: (-counts[c], c))
