"""Fault suite, part 2 (issue #9): every input validated with one line before any heavy work (configs, shards,
dtypes, tokenizers, seeds, guidance, modes, profiles), and non-finite values in weights, scales or cached
embeddings never reach a video. Runs use the demo model in-process."""
import importlib.util
import json

import pytest
import torch

from cli_support import loads_of, run_cli
from conftest import ROOT
from faults_support import (DIT, PROMPT, TINY, files_in, model_copy, read_all, replace_file, replace_json,
                            run_error, run_ok)
from lowvram_stepvideo.face import cli
from lowvram_stepvideo.pipeline import sampling
from lowvram_stepvideo.files.text_cache import EmbeddingCache
from lowvram_stepvideo.loading.model_folder import ModelFolderError, open_model_folder
from lowvram_stepvideo.tools.quantize_folder import quantize_folder
from lowvram_stepvideo.files.tokenizers import load_step_llm_tokenizer

pytestmark = pytest.mark.usefixtures("demo_env", "one_torch_thread")


def _quantize_cli():
    spec = importlib.util.spec_from_file_location("quantize_cli_faults", ROOT / "quantize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _error_of(folder) -> str:
    with pytest.raises(ModelFolderError) as e:
        open_model_folder(folder)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- 4. configs, shards, dtypes and tokenizers: refused when the folder is opened --------------------------------

CONFIGS = {  # name: (file, change, words of the error)
    "num_layers a string": ("transformer/config.json", lambda c: {**c, "num_layers": "2"}, "num_layers = '2'"),
    "num_layers a float": ("transformer/config.json", lambda c: {**c, "num_layers": 2.0}, "must be an integer"),
    "num_layers null": ("transformer/config.json", lambda c: {**c, "num_layers": None}, "num_layers = None"),
    "num_layers zero": ("transformer/config.json", lambda c: {**c, "num_layers": 0}, "must be positive"),
    "norm_eps negative": ("transformer/config.json", lambda c: {**c, "norm_eps": -1}, "norm_eps = -1"),
    "a list, not an object": ("step_llm/config.json", lambda c: [c], "expected a JSON object"),
    "caption_channels strings": ("transformer/config.json", lambda c: {**c, "caption_channels": ["a", 1]},
                                 "caption_channels[0]"),
    "vae ch a bool": ("vae/config.json", lambda c: {**c, "decoder": {**c["decoder"], "ch": True}}, "decoder.ch"),
    "tokenizer config a list": ("hunyuan_clip/tokenizer/tokenizer_config.json", lambda c: [c], "JSON object"),
    "model_max_length 1e30": ("hunyuan_clip/tokenizer/tokenizer_config.json",
                              lambda c: {**c, "model_max_length": 1e30}, "model_max_length 1e+30"),
    "model_max_length 100000": ("hunyuan_clip/tokenizer/tokenizer_config.json",
                                lambda c: {**c, "model_max_length": 100000}, "from 2 to 512"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config_values_are_one_line_errors(case, demo_dir, tmp_path):
    rel, change, words = CONFIGS[case]
    model = model_copy(demo_dir, tmp_path / "m")
    replace_json(model / rel, change)
    err = _error_of(model)
    assert words in err and rel.split("/")[-1] in err, err


def _two_shards(model, tensors, meta, duplicate: bool):
    """The DiT split in two shards listed by an index; with `duplicate`, one tensor is in both."""
    names = sorted(tensors)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:len(names) // 2 + duplicate],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        replace_file(model / "transformer" / shard, {k: tensors[k] for k in keys}, meta)
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (model / "transformer/diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (model / DIT).unlink(missing_ok=True)


def test_the_same_tensor_in_two_shards_is_refused_by_generate_and_quantize(demo_dir, tmp_path, capsys,
                                                                           monkeypatch):
    model = model_copy(demo_dir, tmp_path / "m")
    tensors, meta = read_all(model / DIT)
    _two_shards(model, tensors, meta, duplicate=False)
    open_model_folder(model)                           # split cleanly: fine
    _two_shards(model, tensors, meta, duplicate=True)
    loaded = loads_of(monkeypatch)
    err = run_error(capsys, "--model-dir", model, "--prompt", PROMPT, *TINY, "--output", tmp_path / "o.mp4")
    assert "is in both diffusion_pytorch_model-00001-of-00002" in err and loaded == [], err
    assert _quantize_cli().main(["--model-dir", str(model), "--out", str(tmp_path / "q"), "--format", "int8"]) == 2
    assert "is in both" in capsys.readouterr().err and not (tmp_path / "q.partial").exists()


def test_a_dit_tensor_of_an_integer_dtype_is_refused_before_the_text_phase(demo_dir, tmp_path, capsys, monkeypatch):
    model = model_copy(demo_dir, tmp_path / "m")
    tensors, meta = read_all(model / DIT)
    tensors["adaln_single.linear.bias"] = tensors["adaln_single.linear.bias"].to(torch.int32)
    replace_file(model / DIT, tensors, meta)
    loaded = loads_of(monkeypatch)
    err = run_error(capsys, "--model-dir", model, "--prompt", PROMPT, *TINY, "--output", tmp_path / "o.mp4")
    assert "adaln_single.linear.bias is stored as int32, expected bf16" in err and loaded == [], err


# ---- 3. non-finite weights, scales and embeddings -----------------------------------------------------------------

def test_random_bytes_in_the_weight_data_never_give_a_video(demo_dir, tmp_path, capsys):
    model = model_copy(demo_dir, tmp_path / "m")
    data = bytearray((model / DIT).read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    noise = torch.randint(0, 256, (len(data) - header,), generator=torch.Generator().manual_seed(1),
                          dtype=torch.uint8)
    data[header:] = bytes(noise.numpy())
    (model / DIT).unlink()
    (model / DIT).write_bytes(bytes(data))
    err = run_error(capsys, "--model-dir", model, "--prompt", PROMPT, *TINY, "--output", tmp_path / "o.mp4")
    assert "NaN" in err and files_in(tmp_path) == ["m"], err


def test_nan_scales_in_a_quantized_folder_are_refused_naming_the_tensor(demo_dir, tmp_path, capsys):
    model = tmp_path / "q"
    quantize_folder(demo_dir, model, "int8", components=("transformer",), log=lambda m: None)
    shard = next((model / "transformer").glob("*-00001-of-*.safetensors"))
    tensors, meta = read_all(shard)
    name = next(k for k in sorted(tensors) if k.endswith(".scale"))
    tensors[name][0] = float("nan")
    replace_file(shard, tensors, meta)
    err = run_error(capsys, "--model-dir", model, "--prompt", PROMPT, *TINY, "--output", tmp_path / "o.mp4")
    assert f"tensor {name} holds NaN or inf" in err and not (tmp_path / "o.mp4").exists(), err


def _zeroed(path, keep=lambda key: False):
    tensors, meta = read_all(path)
    replace_file(path, {k: v if keep(k) else torch.zeros_like(v) for k, v in tensors.items()}, meta)


@pytest.mark.parametrize("case", ["vae weights all zero", "int8 scales all zero", "decoding with a zero vae"])
def test_a_network_of_zeros_is_refused_before_any_work(case, demo_dir, tmp_path, capsys, monkeypatch):
    """All-zero VAE weights gave a grey video, all-zero scales an empty one, both with exit 0."""
    if case == "int8 scales all zero":
        model = tmp_path / "q"
        quantize_folder(demo_dir, model, "int8", components=("transformer",), log=lambda m: None)
        for shard in (model / "transformer").glob("*.safetensors"):
            _zeroed(shard, keep=lambda key: not key.endswith(".scale"))
        words = "transformer: its scales are all zero (sampled"
    else:
        model = model_copy(demo_dir, tmp_path / "m")
        _zeroed(model / "vae" / "vae_v2.safetensors")
        words = "vae: its weights are all zero (sampled"
    loaded = loads_of(monkeypatch)
    if case == "decoding with a zero vae":
        z = tmp_path / "z.safetensors"
        run_ok(capsys, "--demo", "--prompt", PROMPT, *TINY, "--output", tmp_path / "v.mp4", "--save-latents", z)
        loaded.clear()
        argv = ["--model-dir", model, "--decode-latents", z]
    else:
        argv = ["--model-dir", model, "--prompt", PROMPT, *TINY]
    err = run_error(capsys, *argv, "--output", tmp_path / "o.mp4")
    assert words in err and loaded == [] and not (tmp_path / "o.mp4").exists(), err


def test_quantize_of_a_nan_source_fails_in_one_line_and_leaves_no_partial_folder(demo_dir, tmp_path, capsys):
    model = model_copy(demo_dir, tmp_path / "m")
    tensors, meta = read_all(model / DIT)
    weight = next(k for k in sorted(tensors) if k.endswith("attn1.to_out.0.weight") or k.endswith("to_out.weight")
                  or (k.endswith(".weight") and tensors[k].dim() == 2))
    tensors[weight][0, 0] = float("nan")
    replace_file(model / DIT, tensors, meta)
    rc = _quantize_cli().main(["--model-dir", str(model), "--out", str(tmp_path / "q"), "--format", "int8"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("quantize: ")]   # progress
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "NaN" in err[0] and weight in err[0], err
    assert files_in(tmp_path) == ["m"]


def test_quantize_refuses_a_shard_size_below_one_megabyte(tmp_path, demo_dir, capsys):
    rc = _quantize_cli().main(["--model-dir", str(demo_dir), "--out", str(tmp_path / "q"), "--format", "int8",
                               "--shard-size-mb", "-5"])
    assert rc == 2 and "at least 1 MB" in capsys.readouterr().err and files_in(tmp_path) == []


@pytest.mark.parametrize("case", ["NaN", "wrong width", "wrong batch", "mask of another length"])
def test_a_cached_embedding_that_does_not_fit_is_a_miss(case, tmp_path, caplog):
    good = (torch.randn(2, 5, 96), torch.ones(2, 82, dtype=torch.int64), torch.randn(2, 77, 32))
    bad = {"NaN": (good[0] * float("nan"), good[1], good[2]),
           "wrong width": (torch.randn(2, 5, 64), good[1], good[2]),
           "wrong batch": tuple(t[:1] for t in good),
           "mask of another length": (good[0], good[1][:, :80], good[2])}[case]
    cache = EmbeddingCache("m", tmp_path, widths=(96, 32))
    cache.put(["p", "n"], good)
    assert cache.get(["p", "n"]) is not None
    cache.put(["p", "n"], bad)
    assert cache.get(["p", "n"]) is None and "ignoring the cached text embeddings" in caplog.text


def test_a_nan_cached_embedding_is_computed_again_in_a_run(tmp_path, capsys, monkeypatch, demo_cache, caplog):
    prompt = "a chef slices vegetables on a wooden board"   # used by no other test
    run_ok(capsys, "--demo", "--prompt", prompt, *TINY, "--output", tmp_path / "a.mp4")
    entry = max((demo_cache / "embeddings").glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    tensors, _ = read_all(entry)
    replace_file(entry, {**tensors, "clip": tensors["clip"] * float("inf")})
    loaded = loads_of(monkeypatch)
    run_ok(capsys, "--demo", "--prompt", prompt, *TINY, "--output", tmp_path / "b.mp4")
    assert "ignoring the cached text embeddings" in caplog.text and "step_llm" in loaded


# ---- 4. request numbers, modes, prompts and profiles --------------------------------------------------------------

REQUESTS = {  # extra arguments: words of the error
    ("--cfg", "nan"): "--cfg nan: the guidance scale must be a finite number",
    ("--cfg", "inf"): "--cfg inf: the guidance scale must be a finite number",
    ("--cfg", "-5"): "--cfg -5.0: a negative guidance scale",
    ("--shift", "inf"): "--shift inf: must be a positive finite number",
    ("--shift", "nan"): "--shift nan: must be a positive finite number",
    ("--seed", "-1"): "--seed -1: seeds go from 0 to 2**64-1",
    ("--seed", str(2**64 + 1)): f"--seed {2**64 + 1}: seeds go from 0",
    ("--dry-run", "--decode-latents", "x.safetensors"): "--dry-run plans a generation",
}


@pytest.mark.parametrize("extra", list(REQUESTS), ids=" ".join)
def test_bad_request_numbers_and_modes_are_refused_before_any_work(extra, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = loads_of(monkeypatch)
    err = run_error(capsys, "--demo", "--prompt", PROMPT, *TINY, *extra)
    assert REQUESTS[extra] in err and loaded == [] and files_in(tmp_path) == [], err


def test_dry_run_is_honoured_with_resume_and_save_latents(tmp_path, capsys, monkeypatch):
    planned = []
    monkeypatch.setattr(cli, "_dry_run", lambda args, spec: planned.append(
        f"{spec.frames}x{spec.height}x{spec.width}") or 0)
    loaded = loads_of(monkeypatch)
    rc, _, err = run_cli(capsys, "--demo", "--prompt", PROMPT, *TINY, "--dry-run", "--resume", "--save-latents",
                         tmp_path / "z.safetensors", "--output", tmp_path / "o.mp4")
    assert rc == 0 and planned == ["17x16x16"] and loaded == [] and files_in(tmp_path) == [], err


def test_seed_range_is_the_generators(tmp_path):
    top = sampling.initial_noise((4,), 2**64 - 1, torch.float32)
    assert not torch.equal(top, sampling.initial_noise((4,), 0, torch.float32))
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 18446744073709551615\]"):
            sampling.initial_noise((4,), bad)


@pytest.mark.slow
def test_a_prompt_longer_than_the_text_window_is_warned_about(demo_dir, tmp_path, capsys):
    prompt = "a cat " * 20000           # 120,000 characters
    step = load_step_llm_tokenizer(demo_dir / "step_llm").count(prompt)
    assert step > 40000
    err = run_ok(capsys, "--demo", "--prompt", prompt, *TINY, "--output", tmp_path / "o.mp4")
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: the prompt is")]
    assert warnings == [f"warning: the prompt is {step} step_llm tokens long; step_llm reads the first 318 and "
                        f"drops the last {step - 318}",
                        "warning: the prompt is 40000 clip tokens long; clip reads the first 75 and drops the last "
                        "39925"], err
    assert open_model_folder(demo_dir).prompt_warnings(PROMPT, "blurry") == []


def test_list_profiles_lists_bad_profiles_as_bad_and_the_good_ones_and_exits_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "cpu.toml").write_text((ROOT / "profiles" / "cpu.toml").read_text())
    (tmp_path / "broken.toml").write_text("device = [")
    monkeypatch.setenv("LOWVRAM_STEPVIDEO_PROFILES", str(tmp_path))
    rc, out, _ = run_cli(capsys, "--list-profiles")
    listed = {ln.split()[0]: ln for ln in out.splitlines()[1:] if not ln.startswith(" ")}
    assert rc == 2 and sorted(listed) == ["broken", "cpu"], out          # listed, and a script can tell
    assert "BAD PROFILE" in listed["broken"] and "not valid TOML" in listed["broken"]
    assert "BAD" not in listed["cpu"] and "17x" in out   # the good one with its ladder
