"""A Step-Video model folder (release layout, or quantize.py's output), validated before any heavy work.

Opening a folder reads every config, every safetensors header and both tokenizers, and checks each component's
tensor names and shapes against its config, so a broken download fails in seconds with a one-line error.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..files.weights import CheckpointError
from ..files.configs import ClipConfig, ConfigError, read_json
from ..errors import StepVideoError
from .loaders import Component, open_clip, open_dit, open_step_llm, open_vae
from ..files.tokenizers import load_clip_tokenizer, load_step_llm_tokenizer, truncation_warnings

DOWNLOAD_HINT = ("download it with: hf download stepfun-ai/stepvideo-t2v --local-dir {path} "
                 "(pip install huggingface_hub), or: modelscope download stepfun-ai/stepvideo-t2v --local-dir {path} "
                 "(pip install modelscope)")
TURBO_KEY = "lowvram_turbo"   # "true" | "false" in a quantized DiT's safetensors header
OPENERS = {"transformer": open_dit, "step_llm": open_step_llm, "hunyuan_clip": open_clip, "vae": open_vae}


class ModelFolderError(StepVideoError, ValueError):
    """The folder is missing, incomplete or not a Step-Video model; the message is one line with the fix."""


@dataclass(frozen=True)
class ModelFolder:
    root: Path
    weight_format: str          # "bf16" (release) or the quantized format of the DiT ("int8", "fp8")
    turbo: bool                 # the step-distilled checkpoint (see is_turbo)
    kind: str = "t2v"           # "t2v" (prompt to video) or "ti2v" (first image + prompt; see DiTConfig.kind)

    def open(self, component: str, layers: int | None = None) -> Component:
        """A fresh Component (meta module + weight index) as a generation runs it: "vae" is the decoder alone,
        "vae_encoder" the encoder alone (TI2V's first image); loading it assigns memory-mapped tensors. `layers`
        (block stacks only: transformer, step_llm, hunyuan_clip) builds that many blocks, for the memory plan."""
        if component == "vae":
            return open_vae(self.root / component, with_encoder=False)
        if component == "vae_encoder":
            return open_vae(self.root / "vae", with_decoder=False)
        if layers is None:
            return OPENERS[component](self.root / component)
        return OPENERS[component](self.root / component, layers=layers)

    def step_llm_tokenizer(self):
        return load_step_llm_tokenizer(self.root / "step_llm")

    def clip_tokenizer(self):
        """At the release's 77 tokens whatever the tokenizer config says, like the reference (the DiT takes 77)."""
        return load_clip_tokenizer(self.root / "hunyuan_clip", ClipConfig.max_length)

    def prompt_warnings(self, prompt: str, negative_prompt: str | None) -> list[str]:
        """Warnings for user texts longer than what the text encoders read (the tokens past it are dropped)."""
        texts = {"prompt": prompt, **({"negative prompt": negative_prompt} if negative_prompt else {})}
        return truncation_warnings({"step_llm": self.step_llm_tokenizer(), "clip": self.clip_tokenizer()}, texts)

    def files(self, component: str) -> list[Path]:
        return [f.path for f in self.open(component).source.files]

def open_model_folder(root: Path) -> ModelFolder:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ModelFolderError(f"model folder {root} not found; " + DOWNLOAD_HINT.format(path=root))
    missing = [c for c in OPENERS if not (root / c).is_dir()]
    if missing:
        raise ModelFolderError(f"{root} is not a Step-Video model folder (no {', '.join(missing)}/); "
                               "point --model-dir at the downloaded stepvideo-t2v folder")
    formats, headers = {}, {}
    try:
        for name, opener in OPENERS.items():
            component = opener(root / name)
            component.check()
            headers[name] = component.source.metadata
            formats[name] = headers[name].get("lowvram_quant_format", "bf16")
        load_step_llm_tokenizer(root / "step_llm")
        load_clip_tokenizer(root / "hunyuan_clip")
        turbo = is_turbo(root, headers["transformer"])
        kind = open_dit(root / "transformer", layers=0).config.kind
        if kind == "ti2v":
            open_vae(root / "vae", with_decoder=False).check()   # the first image is encoded: the encoder must load
    except (CheckpointError, ConfigError) as e:
        raise ModelFolderError(f"{e}") from None
    return ModelFolder(root, formats["transformer"], turbo, kind)


def is_turbo(root: Path, dit_header: dict | None = None) -> bool:
    """Is this the step-distilled turbo checkpoint? Its release files do not say (same configs, same layout, a
    model_index.json that names no repository), so, first that answers: what quantize.py recorded in the DiT's
    safetensors header (TURBO_KEY, from its source folder), model_index.json's `_name_or_path` (written by
    diffusers-style saves), then the folder's name. `--turbo` overrides all of them."""
    recorded = (dit_header or {}).get(TURBO_KEY)
    if recorded in ("true", "false"):
        return recorded == "true"
    index = root / "model_index.json"
    name = read_json(index).get("_name_or_path", "") if index.is_file() else ""
    return "turbo" in str(name).lower() or "turbo" in root.name.lower()
