"""Shared test setup. The test data is in the repository (tests/data/: the reference fixtures, the release's
configs, tokenizers and tensor manifest), so a clone tests itself. Tests run on the fixture folder
tests/data/fixtures/tiny-public plus any folders LOWVRAM_STEPVIDEO_FIXTURES names (os.pathsep-separated)."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
FIXTURES = DATA / "fixtures"
RELEASE = DATA / "release"
RELEASE_MODEL = RELEASE / "stepvideo-t2v"
FIXTURES_ENV = "LOWVRAM_STEPVIDEO_FIXTURES"


def ti2v_fixture() -> Path:
    """The Step-Video-TI2V reference fixtures (fixtures/README.md, ti2v-public)."""
    return FIXTURES / "ti2v-public"


def fixture_dirs() -> list[Path]:
    """The in-repo tiny-public fixture, then the folders LOWVRAM_STEPVIDEO_FIXTURES adds (each once)."""
    dirs = [FIXTURES / "tiny-public"]
    for raw in os.environ.get(FIXTURES_ENV, "").split(os.pathsep):
        if raw and all(Path(raw).resolve() != d.resolve() for d in dirs):
            dirs.append(Path(raw))
    return dirs


def pytest_generate_tests(metafunc):
    if "fixture_dir" in metafunc.fixturenames:
        dirs = fixture_dirs()
        metafunc.parametrize("fixture_dir", dirs, ids=[d.name for d in dirs])


def read_io(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a fixture safetensors file plus its metadata."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


@pytest.fixture(scope="session", autouse=True)
def _session_cache_folder(tmp_path_factory):
    """What tests cache (memory plans, text embeddings, the demo model) goes to the session's folder, never to
    the user's ~/.cache."""
    from lowvram_stepvideo.files.caches import CACHE_ENV
    patch = pytest.MonkeyPatch()
    patch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "lowvram-cache"))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _ctrl_c_left_as_it_was():
    """A test that leaves Ctrl-C ignored in this process makes every process it starts later ignore it too (a web
    page that never stops): no test may change the SIGINT handler for good."""
    import signal
    before = signal.getsignal(signal.SIGINT)
    yield
    assert signal.getsignal(signal.SIGINT) == before, "the test left the SIGINT handler changed"


@pytest.fixture(autouse=True)
def _earlier_tests_objects_frozen():
    """The runtime collects garbage after every phase (DeviceRuntime.free), and a full collection walks every object
    of the process: here that is torch, pytest and every earlier test's leftovers (a quick run made 257 such calls,
    75 s in all on the busy dev VM). What earlier tests left is collected once here and the survivors frozen, so a
    test's collections walk only the objects it made itself, as in a real run's process. Nothing this test makes
    is frozen."""
    import gc
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def manifest_shapes(component: str) -> dict[str, tuple[int, ...]]:
    """Full-size tensor names and shapes of one released network ('transformer', 'step_llm', 'hunyuan_clip',
    'vae_v2') as stored in the release files."""
    import json
    raw = json.loads((RELEASE / "state_dict_manifest.json").read_text())[component]
    return {e["key"]: tuple(e["shape"]) for e in raw["keys"]}


def complete_model_dir(fixture_dir: Path, tmp_path: Path) -> Path:
    """The fixture's model_dir plus the release tokenizers (fixtures ship none), as links in tmp_path."""
    src, dst = fixture_dir / "model_dir", tmp_path / "model_dir"
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).symlink_to(item)
    step = dst / "step_llm"
    step.unlink()
    step.mkdir()
    for item in (src / "step_llm").iterdir():
        (step / item.name).symlink_to(item)
    (step / "step1_chat_tokenizer.model").symlink_to(RELEASE_MODEL / "step_llm" / "step1_chat_tokenizer.model")
    clip = dst / "hunyuan_clip"
    clip.unlink()
    clip.mkdir()
    (clip / "clip_text_encoder").symlink_to(src / "hunyuan_clip" / "clip_text_encoder")
    (clip / "tokenizer").symlink_to(RELEASE_MODEL / "hunyuan_clip" / "tokenizer")
    return dst


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_for_the_session():
    """Every test computes on one intra-op thread, as the subprocesses the tests start do (OMP_NUM_THREADS=1). On
    the 2 vCPU dev VM a second thread saves little when the machine is idle (the whole quick run takes about as
    long either way) and costs a lot of waiting when another process holds the other core (the reference-fixture
    and VAE tests took 1.5x as long)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine they cost a lot of waiting (the
    session already runs on one thread; this keeps a module that names it on one thread whatever the session
    does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def link_tree(src: Path, dst: Path) -> Path:
    """Hard-link (or copy) every file under src into dst; edits must replace files, never write into them (a hard
    link shares the original's inode)."""
    for f in src.rglob("*"):
        if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copyfile(f, target)
    return dst


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One cache folder for the whole session (demo model and embedding cache): the demo model is built once."""
    from lowvram_stepvideo.loading import demo
    cache = tmp_path_factory.getbasetemp() / "lowvram-cache"
    demo.build_demo_model(cache / f"demo-v{demo.DEMO_VERSION}")
    return cache


@pytest.fixture
def demo_env(monkeypatch, demo_cache):
    """generate.py --demo and the embedding cache use the session's cache folder."""
    from lowvram_stepvideo.loading import demo
    monkeypatch.setenv(demo.CACHE_ENV, str(demo_cache))


@pytest.fixture(scope="session")
def ti2v_demo_dir(demo_cache):
    """The tiny TI2V demo model (generate.py --demo --image), built once in the session's cache folder."""
    from lowvram_stepvideo.loading import demo
    return demo.build_demo_model(demo_cache / f"demo-ti2v-v{demo.DEMO_VERSION}", kind="ti2v")


@pytest.fixture
def demo_dir(demo_cache):
    from lowvram_stepvideo.loading import demo
    return demo_cache / f"demo-v{demo.DEMO_VERSION}"


def tiny_dit(layers: int, std: float):
    """A seeded random DiT of `layers` one-head blocks (in/out 4 channels, captions 16 and 8 wide), weights ~ N(0,
    std): for tests of what runs around the blocks (compile, step cache)."""
    from lowvram_stepvideo.files.configs import DiTConfig
    from lowvram_stepvideo.models.dit import StepVideoModel
    torch.manual_seed(0)
    model = StepVideoModel(DiTConfig(num_layers=layers, num_heads=1, in_channels=4, out_channels=4,
                                     caption_channels=(16, 8)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model
