"""Plan a release (bf16) folder as its quantized version would run (`--dry-run --assume-format int8|fp8`).

A user who has just downloaded the release learns what quantizing buys before spending the time. The folder's
components that quantize.py quantizes by default get a weight index that looks like quantize.py's output: the same
tensor names plus one float32 `.scale` per quantized weight, quantized weights in the format's dtype, and the
scheme in the metadata. Loading with a data-free reader (the memory plan's) then builds exactly the modules a
quantized folder loads into; nothing is read from the files.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import quant
from ..files.weights import TensorRef, WeightSource
from ..loading.model_folder import ModelFolder, ModelFolderError


class AssumedQuantizedSource(WeightSource):
    """The weight index quantize.py would write for `base` (no data: refs only)."""

    def __init__(self, base: WeightSource, component: str, fmt: quant.QFormat):
        super().__init__(base.files, base.label)
        self.scheme = quant.Scheme(fmt, quant.plan_quantization(component, base.keys()))
        self.refs = {}
        for name in base.keys():
            self.refs[name] = self._quantized_ref(base.ref(name), self.scheme.tensors.get(name))
            if self.scheme.tensors.get(name):
                rows = base.ref(name).shape[0]
                self.refs[quant.scale_name(name)] = TensorRef(base.ref(name).file, torch.float32, (rows,), 0, 4 * rows)

    def _quantized_ref(self, ref: TensorRef, kind: str | None) -> TensorRef:
        if kind is None:
            return ref
        dtype = quant.EMBEDDING_FORMAT.dtype if kind == "embedding" else self.scheme.fmt.dtype
        return TensorRef(ref.file, dtype, ref.shape, ref.start, ref.nbytes // ref.dtype.itemsize)

    @property
    def metadata(self) -> dict[str, str]:
        return self.scheme.metadata()

    def keys(self):
        return self.refs.keys()

    def ref(self, name: str) -> TensorRef:
        return self.refs[name]

    def tensor(self, name: str) -> torch.Tensor:
        raise RuntimeError("an assumed-format folder is for planning only; quantize it with quantize.py to run it")

    read = tensor


@dataclass(frozen=True)
class AssumedFormatFolder(ModelFolder):
    """A release folder seen as quantize.py's output in `weight_format` (for the memory plan only)."""

    def open(self, component: str, **kwargs):
        opened = super().open(component, **kwargs)     # kwargs: whatever ModelFolder.open takes (layers, ...)
        if component in quant.DEFAULT_COMPONENTS and quant.SCHEME_KEY not in opened.source.metadata:
            opened.source = AssumedQuantizedSource(opened.source, component, quant.get_format(self.weight_format))
        return opened


def assume_format(folder: ModelFolder, fmt: str | None) -> ModelFolder:
    """`folder` planned as if quantized to `fmt` ("int8" | "fp8"); unchanged for None or its own format."""
    if fmt is None or fmt == folder.weight_format:
        return folder
    if fmt not in quant.FORMATS:
        raise ValueError(f"--assume-format {fmt!r}: choose one of {', '.join(quant.FORMATS)}")
    if folder.weight_format != "bf16":
        raise ModelFolderError(f"{folder.root} is already quantized ({folder.weight_format}); --assume-format only "
                               "applies to a release (bf16) folder, drop it to plan this one as it is")
    return AssumedFormatFolder(folder.root, fmt, folder.turbo, folder.kind, folder.published)
