"""Pure nn.Modules of the released networks (attribute names = checkpoint keys) and their loaders."""
from ..loaders import load_clip, load_dit, load_step_llm, load_vae
from ..tokenizers import load_clip_tokenizer, load_step_llm_tokenizer

__all__ = ["load_dit", "load_vae", "load_step_llm", "load_clip", "load_step_llm_tokenizer", "load_clip_tokenizer"]
