"""A Step-Video model folder (release layout, or quantize.py's output), validated before any heavy work.

Opening a folder reads every config, every safetensors header and both tokenizers, and checks each component's
tensor names and shapes against its config, so a broken download fails in seconds with a one-line error.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError, read_json
from .loaders import Component, open_clip, open_dit, open_step_llm, open_vae
from .tokenizers import load_clip_tokenizer, load_step_llm_tokenizer

DOWNLOAD_HINT = ("download it with: hf download stepfun-ai/stepvideo-t2v --local-dir {path} "
                 "(pip install huggingface_hub), or: modelscope download stepfun-ai/stepvideo-t2v --local-dir {path} "
                 "(pip install modelscope)")
OPENERS = {"transformer": open_dit, "step_llm": open_step_llm, "hunyuan_clip": open_clip, "vae": open_vae}


class ModelFolderError(ValueError):
    """The folder is missing, incomplete or not a Step-Video model; the message is one line with the fix."""


@dataclass(frozen=True)
class ModelFolder:
    root: Path
    weight_format: str          # "bf16" (release) or the quantized format of the DiT ("int8", "fp8")
    turbo: bool                 # the step-distilled checkpoint (recognised by its folder name)

    def open(self, component: str, layers: int | None = None) -> Component:
        """A fresh Component (meta module + weight index) as a generation runs it (the VAE without its encoder:
        nothing here encodes); loading it assigns memory-mapped tensors. `layers` (block stacks only:
        transformer, step_llm, hunyuan_clip) builds that many blocks, for the memory plan."""
        if component == "vae":
            return open_vae(self.root / component, with_encoder=False)
        if layers is None:
            return OPENERS[component](self.root / component)
        return OPENERS[component](self.root / component, layers=layers)

    def step_llm_tokenizer(self):
        return load_step_llm_tokenizer(self.root / "step_llm")

    def clip_tokenizer(self):
        return load_clip_tokenizer(self.root / "hunyuan_clip")

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
    formats = {}
    try:
        for name, opener in OPENERS.items():
            component = opener(root / name)
            component.check()
            formats[name] = component.source.metadata.get("lowvram_quant_format", "bf16")
        load_step_llm_tokenizer(root / "step_llm")
        load_clip_tokenizer(root / "hunyuan_clip")
        turbo = is_turbo(root)
    except (CheckpointError, ConfigError) as e:
        raise ModelFolderError(f"{e}") from None
    return ModelFolder(root, formats["transformer"], turbo)


def is_turbo(root: Path) -> bool:
    index = root / "model_index.json"
    name = read_json(index).get("_name_or_path", "") if index.is_file() else ""
    return "turbo" in root.name.lower() or "turbo" in str(name).lower()
