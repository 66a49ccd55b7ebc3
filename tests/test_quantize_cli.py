"""quantize.py: accuracy of quantized fixture folders through the normal loaders, folder layout, resume, errors."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import RELEASE_MODEL, ROOT, fixture_dirs, read_io
from safetensors.torch import load_file, save_file

from lowvram_stepvideo.models import quant
from lowvram_stepvideo.tools import quantize_folder as qf
from lowvram_stepvideo.tools import quantize_io
from lowvram_stepvideo.files.weights import SafetensorsFile, open_weights
from lowvram_stepvideo.loading.loaders import load_clip, load_dit, load_step_llm

LIMITS = {"int8": 0.020, "fp8": 0.075}   # relative Frobenius error against the float32 reference outputs
DIT_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_2", "encoder_attention_mask")
DIT_FILE = "transformer/diffusion_pytorch_model.safetensors"


def _load_cli():
    spec = importlib.util.spec_from_file_location("quantize_cli", ROOT / "quantize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = _load_cli()


def run(capsys, *args) -> tuple[int, str, str]:
    code = CLI.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def quantize(capsys, src, dst, fmt="int8", *extra):
    code, out, err = run(capsys, "--model-dir", src, "--out", dst, "--format", fmt, *extra)
    assert code == 0, err
    return out, err


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def copy_tree(src: Path, dst: Path) -> Path:
    """A writable copy of a (read-only) fixture folder."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return copy_tree(fixture_dirs()[0] / "model_dir", tmp_path / "src")


# ---------------------------------------------------------------- accuracy through the normal loaders

@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_fixture_matches_reference_outputs(fixture_dir, fmt, tmp_path, capsys):
    dst = tmp_path / f"q-{fmt}"
    quantize(capsys, fixture_dir / "model_dir", dst, fmt)
    dit = load_dit(dst / "transformer", dtype=torch.float32)
    assert isinstance(dit.transformer_blocks[0].attn1.wqkv, quant.QuantLinear)
    io, _ = read_io(fixture_dir / "dit_io.safetensors")
    with torch.inference_mode():
        dit_err = rel_error(dit(*[io[f"in.{k}"] for k in DIT_INPUTS]), io["out.x"])
    llm = load_step_llm(dst / "step_llm", dtype=torch.float32)
    assert isinstance(llm.tok_embeddings.word_embeddings, quant.QuantEmbedding)
    text, _ = read_io(fixture_dir / "text_io.safetensors")
    mask = text["in.step_llm.attention_mask"].bool()
    with torch.no_grad():
        y = llm(text["in.step_llm.input_ids"], text["in.step_llm.attention_mask"])
    llm_err = rel_error(y[mask], text["out.step_llm.y"][mask])
    print(f"\n{fixture_dir.name} {fmt}: DiT out.x {100 * dit_err:.2f}%, step_llm y {100 * llm_err:.2f}%")
    assert dit_err <= LIMITS[fmt] and llm_err <= LIMITS[fmt], (dit_err, llm_err)


def test_every_shard_records_the_scheme_and_the_index_lists_every_tensor(tmp_path, capsys):
    dst = tmp_path / "q"
    _, err = quantize(capsys, fixture_dirs()[0] / "model_dir", dst, "fp8", "--shard-size-mb", "1")
    progress = [ln for ln in err.splitlines() if ln.startswith("quantize: ")]   # stderr is not a terminal here
    assert progress[0].startswith("quantize: 0.00/") and "(100%)" in progress[-1] and "\r" not in err
    index = json.loads((dst / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    plans = []
    for name in shards:
        f = SafetensorsFile(dst / "transformer" / name)
        scheme = json.loads(f.metadata[quant.SCHEME_KEY])
        assert scheme["format"] == "fp8" and scheme["granularity"] == "per_output_channel"
        plans.append(scheme["tensors"])
        assert {k for k, v in index["weight_map"].items() if v == name} == set(f.refs)
    assert all(p == plans[0] for p in plans)
    source = open_weights(fixture_dirs()[0] / "model_dir/transformer", ("diffusion_pytorch_model",))
    assert plans[0] == quant.plan_quantization("transformer", source.keys())


def test_output_equals_whole_tensor_quantization_whatever_the_block_size(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quantize_io, "BLOCK_ELEMS", 1000)  # many row blocks per weight
    monkeypatch.setattr(quantize_io, "COPY_BYTES", 300)    # many pieces per copied tensor
    dst = tmp_path / "q"
    quantize(capsys, model_dir, dst, "int8", "--components", "transformer,step_llm,hunyuan_clip")
    for comp, folder, stem in (("transformer", "transformer", "diffusion_pytorch_model"),
                               ("step_llm", "step_llm", "model"),
                               ("hunyuan_clip", "hunyuan_clip/clip_text_encoder", "model")):
        source = {k: v for f in (model_dir / folder).glob("*.safetensors") for k, v in load_file(f).items()}
        out = {k: v for f in (dst / folder).glob(f"{stem}-*.safetensors") for k, v in load_file(f).items()}
        plan = quant.plan_quantization(comp, source)
        assert plan and set(out) == set(source) | {quant.scale_name(k) for k in plan}
        for key, tensor in source.items():
            if key in plan:
                codes, scale = quant.quantize_rows(tensor, quant.FORMATS["int8"])
                assert torch.equal(out[key], codes) and torch.equal(out[quant.scale_name(key)], scale), key
            else:
                assert out[key].dtype == tensor.dtype and torch.equal(out[key], tensor), key
    clip = load_clip(dst / "hunyuan_clip")  # a quantized CLIP loads too (optional component)
    assert isinstance(clip.encoder.layer[0].intermediate.dense, quant.QuantLinear)


# ---------------------------------------------------------------- layout: carried files, CLIP pickle

def _release_like(model_dir: Path) -> Path:
    """Turn the fixture copy into the release's file set: tokenizers present, CLIP as a pickle with bert. keys."""
    tokenizer = "step_llm/step1_chat_tokenizer.model"
    shutil.copyfile(RELEASE_MODEL / tokenizer, model_dir / tokenizer)
    shutil.copytree(RELEASE_MODEL / "hunyuan_clip/tokenizer", model_dir / "hunyuan_clip/tokenizer",
                    copy_function=shutil.copyfile)
    clip = model_dir / "hunyuan_clip/clip_text_encoder"
    state = {f"bert.{k}": v for k, v in load_file(clip / "model.safetensors").items()}
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save(state, clip / "pytorch_model.bin")
    (clip / "model.safetensors").unlink()
    return model_dir


def test_release_layout_is_carried_and_clip_pickle_becomes_safetensors(model_dir, tmp_path, capsys):
    src = _release_like(model_dir)
    dst = tmp_path / "q"
    _, err = quantize(capsys, src, dst, "int8", "--components", "transformer")
    linked = sum(1 for p in dst.rglob("*") if p.is_file() and p.stat().st_nlink > 1)
    assert f"note: {linked} files (configs, tokenizers, VAE, ...) are hard links to the same files in {src} (0 " \
           "copied): edit neither in place" in err, err   # said where it happens, and in --help
    assert "hard-linked" in CLI.parse_args.__globals__["EPILOG"]
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                "step_llm/config.json", "step_llm/step1_chat_tokenizer.model", "step_llm/model.safetensors",
                "hunyuan_clip/tokenizer/vocab.txt", "hunyuan_clip/tokenizer/tokenizer_config.json",
                "hunyuan_clip/clip_text_encoder/config.json", "vae/vae_v2.safetensors", "vae/config.json"):
        assert (dst / rel).read_bytes() == (src / rel).read_bytes(), rel
        assert (dst / rel).stat().st_ino == (src / rel).stat().st_ino, f"{rel} is not hard-linked"
    clip_dir = dst / "hunyuan_clip/clip_text_encoder"
    assert not (clip_dir / "pytorch_model.bin").exists() and (clip_dir / "model.safetensors.index.json").is_file()
    assert not (dst / DIT_FILE).exists()  # replaced by the quantized shards
    ids = torch.randint(0, 512, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        assert torch.equal(load_clip(dst / "hunyuan_clip")(ids, mask), load_clip(src / "hunyuan_clip")(ids, mask))
    assert load_step_llm(dst / "step_llm").transformer.layers[0].attention.wqkv.weight.dtype == torch.bfloat16


def test_files_are_copied_where_hard_links_fail(model_dir, tmp_path, capsys, monkeypatch):
    def no_links(src, dst, **kwargs):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(qf.os, "link", no_links)
    dst = tmp_path / "q"
    _, err = quantize(capsys, model_dir, dst, "int8", "--components", "transformer")
    assert "hard links" not in err   # copies: nothing shared to warn about
    for rel in ("model_index.json", "step_llm/model.safetensors", "vae/vae_v2.safetensors"):
        assert (dst / rel).read_bytes() == (model_dir / rel).read_bytes()
        assert (dst / rel).stat().st_ino != (model_dir / rel).stat().st_ino


# ---------------------------------------------------------------- resume, overwrite

def _interrupt_after_first_shard(monkeypatch):
    real, calls = qf.write_shard, []

    def write_then_interrupt(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(qf, "write_shard", write_then_interrupt)
    return real


def _weights(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_rerun_after_interruption_reuses_completed_shards(model_dir, tmp_path, capsys, monkeypatch):
    dst, args = tmp_path / "q", ["--shard-size-mb", "1"]
    real = _interrupt_after_first_shard(monkeypatch)
    code, _, err = run(capsys, "--model-dir", model_dir, "--out", dst, "--format", "int8", *args)
    assert code == 130 and "run the same command again to resume" in err and not dst.exists()
    first = "transformer/diffusion_pytorch_model-00001-of-00003.safetensors"
    before = (dst.with_name("q.partial") / first).stat()
    monkeypatch.setattr(qf, "write_shard", real)
    out, err = quantize(capsys, model_dir, dst, "int8", *args)
    assert f"reusing {first}" in err and "1 reused" in out
    after = (dst / first).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not dst.with_name("q.partial").exists() and not (dst / qf.STATE_FILE).exists()
    quantize(capsys, model_dir, tmp_path / "fresh", "int8", *args)
    assert _weights(dst) == _weights(tmp_path / "fresh")


def test_damaged_partial_shard_is_rewritten(model_dir, tmp_path, capsys, monkeypatch):
    dst, args = tmp_path / "q", ["--shard-size-mb", "1"]
    real = _interrupt_after_first_shard(monkeypatch)
    run(capsys, "--model-dir", model_dir, "--out", dst, "--format", "int8", *args)
    rel = "transformer/diffusion_pytorch_model-00001-of-00003.safetensors"
    shard = dst.with_name("q.partial") / rel
    good = shard.read_bytes()
    shard.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    monkeypatch.setattr(qf, "write_shard", real)
    out, err = quantize(capsys, model_dir, dst, "int8", *args)
    assert "reusing" not in err and "0 reused" in out
    assert (dst / rel).read_bytes() == good


def test_partial_folder_of_other_options_is_discarded(model_dir, tmp_path, capsys, monkeypatch):
    dst, args = tmp_path / "q", ["--shard-size-mb", "1"]
    real = _interrupt_after_first_shard(monkeypatch)
    run(capsys, "--model-dir", model_dir, "--out", dst, "--format", "int8", *args)
    monkeypatch.setattr(qf, "write_shard", real)
    out, err = quantize(capsys, model_dir, dst, "fp8", *args)
    assert "discarding" in err and "0 reused" in out
    assert json.loads(SafetensorsFile(next((dst / "transformer").glob("*00001-of*"))).metadata[quant.SCHEME_KEY])[
        "format"] == "fp8"


def test_existing_out_is_refused_without_force_and_replaced_with_it(model_dir, tmp_path, capsys):
    dst = tmp_path / "q"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    code, _, err = run(capsys, "--model-dir", model_dir, "--out", dst, "--format", "int8")
    assert code == 2 and "already exists; pass --force" in err and (dst / "keep.txt").exists()
    quantize(capsys, model_dir, dst, "int8", "--force")
    assert not (dst / "keep.txt").exists() and (dst / "transformer/config.json").is_file()


# ---------------------------------------------------------------- one-line errors

def _sharded(model_dir: Path) -> Path:
    """Split the fixture DiT file into two shards with an index, like the release."""
    tensors = load_file(model_dir / DIT_FILE)
    names = sorted(tensors)
    parts = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
             "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(model_dir / "transformer" / shard))
    weight_map = {k: shard for shard, keys in parts.items() for k in keys}
    (model_dir / "transformer/diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (model_dir / DIT_FILE).unlink()
    return model_dir / "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"


def _break_source(case: str, model_dir: Path) -> str | None:
    """Damage the source folder for `case`; return the words its error must contain (None: not such a case)."""
    if case == "not_step_video":
        (model_dir / "model_index.json").unlink()
        return "not a Step-Video model folder"
    if case == "missing_shard":
        _sharded(model_dir).unlink()
        return "not found"
    if case == "truncated_shard":
        shard = _sharded(model_dir)
        os.truncate(shard, shard.stat().st_size - 100)
        return "truncated"
    if case == "corrupt_header":
        (model_dir / DIT_FILE).write_bytes(b"\xff" * 64)
        return "not a readable safetensors file"
    if case == "missing_component":
        shutil.rmtree(model_dir / "step_llm")
        return "has no step_llm/ folder"
    return None


def _case(case: str, model_dir: Path, tmp_path: Path, capsys, monkeypatch) -> tuple[list, str]:
    """Arguments for one bad request and the words its error must contain."""
    base = ["--model-dir", model_dir, "--out", tmp_path / "out", "--format", "int8"]
    words = _break_source(case, model_dir)
    if words:
        return base, words
    if case == "unknown_format":
        return base[:-1] + ["int4"], "unknown quantization format 'int4'"
    if case == "unknown_component":
        return base + ["--components", "transformer,vae"], "unknown component 'vae'"
    if case == "out_inside_source":
        return base[:2] + ["--out", model_dir / "transformer" / "q"] + base[4:], "inside --model-dir"
    if case == "source_inside_out":
        return base[:2] + ["--out", model_dir.parent, "--format", "int8", "--force"], "inside --out"
    if case == "already_quantized":
        quantize(capsys, model_dir, tmp_path / "q8", "fp8")
        return ["--model-dir", tmp_path / "q8"] + base[2:], "already quantized"
    assert case == "no_disk_space"
    monkeypatch.setattr(qf.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**12, used=10**12, free=1000))
    return base, "not enough disk space"


@pytest.mark.parametrize("case", ["not_step_video", "missing_shard", "truncated_shard", "corrupt_header",
                                  "unknown_format", "unknown_component", "missing_component", "out_inside_source",
                                  "source_inside_out", "already_quantized", "no_disk_space"])
def test_bad_requests_fail_with_one_line(case, model_dir, tmp_path, capsys, monkeypatch):
    args, words = _case(case, model_dir, tmp_path, capsys, monkeypatch)
    code, out, err = run(capsys, *args)
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("quantize: ")]   # progress lines
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert model_dir.is_dir()


def test_process_exit_code_and_message_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "quantize.py"), "--model-dir", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "q"), "--format", "int8"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""   # the same status as generate.py's usage errors
    assert proc.stderr.strip().splitlines() == [f"error: --model-dir {tmp_path / 'nowhere'}: folder not found"]


# ---------------------------------------------------------------- --verify

def test_verify_prints_per_layer_errors_and_names_the_worst(model_dir, tmp_path, capsys):
    out, _ = quantize(capsys, model_dir, tmp_path / "q", "int8", "--verify", "--components", "transformer,step_llm")
    table = out.splitlines()[1:]
    assert table[0].split() == ["component", "tensor", "shape", "rel.", "error"]
    rows = [line.split() for line in table[1:-1]]
    assert {r[0] for r in rows} == {"transformer", "step_llm"} and len(rows) == 16
    errors = {r[1]: float(r[3].rstrip("%")) for r in rows}
    # int8 with per-row max scaling: the error per element is at most half a step (row max / 254), which is a
    # relative error of about 1% of the row's rms for these weights (max/rms < 3.2); bf16 would show 0.2-0.4%
    assert all(0.3 < e < 1.5 for e in errors.values()), errors
    worst = max(errors, key=errors.get)
    assert table[-1] == f"worst layer: {rows[[r[1] for r in rows].index(worst)][0]} {worst} {errors[worst]:.3f}%"
